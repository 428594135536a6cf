"""`ganray compare`: the learners of the GAN argument (ae, vae, energy, gan) trained by the same
Trainer on one config's data at the same budget, scored alike (runner.py)."""
