"""ganray.models: the pure-torch layer (networks, losses, EMA, the VAE baseline, metrics).

Imports torch, torchvision, torchmetrics and numpy only: never ray, mlflow or the config tree,
so workers and user code can use it without the control plane.
"""
