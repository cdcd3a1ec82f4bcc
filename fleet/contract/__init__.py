"""The contract every deployable shares: the wire protocol, the bundle manifest, signing,
desired and reported state, label selectors, and the error root. Pure: no network, no daemon,
no command line."""
