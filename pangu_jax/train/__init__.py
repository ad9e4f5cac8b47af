"""Training PanGu-alpha: fine-tuning and continued pre-training."""

from .data import BadLineWarning, DataConfig, DataSummary, TrainData, load_data

__all__ = ["BadLineWarning", "DataConfig", "DataSummary", "TrainData", "load_data"]
