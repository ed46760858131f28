"""Ray Train V2 + FSDP2 training of the refiners + LI-DiT on the feature cache (no LLM or VAE in the loop)."""
