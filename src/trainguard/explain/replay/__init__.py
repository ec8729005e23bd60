"""`trainguard replay`: re-run recorded steps from checkpoints and name the first that differs."""
