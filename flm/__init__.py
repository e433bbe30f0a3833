"""FLM: growth-based LLM pre-training."""
