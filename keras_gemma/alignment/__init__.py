"""Alignment: reward models, policy optimisation (RLOO, GRPO), DPO and their callbacks."""
