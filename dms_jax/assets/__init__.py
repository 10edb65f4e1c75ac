"""Files shipped with the package: the small default model used by `infer.py` with no arguments."""
import os

DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model")
ASSETS_DIR = os.path.dirname(os.path.abspath(__file__))
