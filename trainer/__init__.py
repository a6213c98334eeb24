"""Training one config on one fold: the node image cache, augmentation, timm models, the trial loop."""
import os

# albumentations otherwise checks for updates over the network on every
# import, Ray workers included.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
