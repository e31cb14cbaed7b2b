"""Can I run it? GPU memory for a Hugging Face model and a job, term by term.

    from estimator import Job, estimate, inventory_from_config
    result = estimate(config_dict, Job(mode="qlora", batch_size=4, seq_len=2048))
    result.peak_allocated_bytes, result.device_total_bytes, result.breakdown

Importing this package is cheap: torch and transformers load only when an inventory is first
built from a config (the offline catalog ships prebuilt inventories).
"""

from estimator.estimate import Component, Estimate, estimate
from estimator.inventory import Inventory, UnsupportedModelError, inventory_from_config
from estimator.job import Attention, BaseDtype, Job, Loss, Mode, Mxfp4, Optimizer, Precision, Quant, Weights

__all__ = [
    "Attention",
    "BaseDtype",
    "Component",
    "Estimate",
    "Inventory",
    "Job",
    "Loss",
    "Mode",
    "Mxfp4",
    "Optimizer",
    "Precision",
    "Quant",
    "UnsupportedModelError",
    "Weights",
    "estimate",
    "inventory_from_config",
]
