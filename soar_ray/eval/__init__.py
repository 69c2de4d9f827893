"""Evaluation: sample a prompt set with fixed seeds on the rollout workers, score it with the
reward pool, and report (`soar-ray eval`; a GRPO stage's evaluation uses the same sampling)."""
