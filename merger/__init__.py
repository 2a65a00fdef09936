"""Merge FURINA adapters into dense Hugging Face checkpoints, or export them as PEFT LoRA.

The package contains no HTTP code: the service and the `furina merge` and
`furina export-lora` commands call `merge` and `export_lora`.
"""

from merger.errors import MergeCancelled, MergeError
from merger.export_lora import export_lora
from merger.merge import MergeReport, merge
from merger.verify import VerifySettings

__all__ = ["MergeCancelled", "MergeError", "MergeReport", "VerifySettings", "export_lora", "merge"]
