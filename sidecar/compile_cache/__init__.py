"""Compile caches beside the weights: a replica installs a live source's verified cache of its own key before the
engine compiles, and publishes its cache once the engine serves (docs/VLLM.md: compile caches)."""
