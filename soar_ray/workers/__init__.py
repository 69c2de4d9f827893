"""Plain classes doing the work (learner, rollout, scorer), testable without Ray."""
