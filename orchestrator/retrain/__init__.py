"""Scheduled retraining: train a challenger from the champion, promote it only when it measurably
wins (`champion`), one retrain per model at a time (`lock`), and the `ganray retrain` command."""
