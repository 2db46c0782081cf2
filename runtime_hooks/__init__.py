"""Runtime hooks: code that runs inside the engine process and exposes its weights to the sidecar."""
