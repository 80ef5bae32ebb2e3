"""Task metrics live with fine-tuning (`budgetlm.finetune.metrics`), so `evaluate` depends on
`finetune` and never the other way; this name keeps old imports working (the same module)."""

import sys

from budgetlm.finetune import metrics

sys.modules[__name__] = metrics
