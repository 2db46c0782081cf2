"""mx-sidecar: GPU-to-GPU weight transfer between LLM inference replicas."""

__version__ = "0.1.0"
