"""The commands that are not training stages: eval, generate, plot, env."""
