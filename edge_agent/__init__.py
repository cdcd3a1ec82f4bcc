"""The edge agent: runs a bundle's model locally and offloads hard inputs to the cloud hub."""
