"""Pure tensor math, torch only: flow.py primitives, soar.py SOAR, grpo.py Flow-GRPO."""
