"""``ktl synthesize``: a labelled synthetic dataset from a few private images, with a stated
(epsilon, delta) differential-privacy guarantee. See docs/synthesize.md."""

from ktl.synthesize.accountant import BudgetError, PrivacyPlan
from ktl.synthesize.config import SynthesisConfig, SynthesisConfigError, build_config, load_config
from ktl.synthesize.embedding import EmbeddingError, load_embedding
from ktl.synthesize.export import ExportError, verify_dataset
from ktl.synthesize.private import PrivateDataError
from ktl.synthesize.run import SynthesisResult, Synthesizer, synthesize

USER_ERRORS = (
    BudgetError,
    SynthesisConfigError,
    EmbeddingError,
    ExportError,
    PrivateDataError,
)

__all__ = [
    "USER_ERRORS",
    "BudgetError",
    "EmbeddingError",
    "ExportError",
    "PrivacyPlan",
    "PrivateDataError",
    "SynthesisConfig",
    "SynthesisConfigError",
    "SynthesisResult",
    "Synthesizer",
    "build_config",
    "load_config",
    "load_embedding",
    "synthesize",
    "verify_dataset",
]
