"""Fine-tuning a pretrained run on a downstream task.

    tasks.py    read CSV/TSV/JSONL/CoNLL/word-TAG files into examples; write predictions back
    heads.py    the task model: pretrained body + pooled classification/regression or per-token head
    methods.py  full, LoRA (peft), bottleneck adapters, prefix tuning: transforms of a built model
    train.py    `budgetlm finetune`: AdamW, warm-up + linear decay, early stopping, best checkpoint
    predict.py  `budgetlm predict`: reload a fine-tuned directory and label a file
"""
