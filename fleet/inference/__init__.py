"""What the agent and the hub both run: the engine, the backends, preprocessing, hard-example
policies, the fidelity and health checks, and the dynamic batcher."""
