"""A tiny random Llama with a byte-level BPE tokenizer, built in-process (no Hub access).

``build_tiny_model_dir(path)`` writes a directory that loads like a Hub model
(``CODELOOP_MODEL=<dir>``): config, weights, tokenizer and a deepseek-coder style chat template
(``### Instruction:`` / ``### Response:``, turns ended by ``<|EOT|>``), so the real code path —
template, special tokens, byte-level BPE merges — is exercised. Weights are random but seeded,
so greedy output is the same on every run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# deepseek-coder's own special tokens, fullwidth bars included
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<|EOT|>"
PAD = "<｜end▁of▁sentence｜>"

# The shape of the deepseek-coder-instruct template, shortened: a system turn is optional and
# every assistant turn ends with <|EOT|>, which is also the tokenizer's eos.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{ message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n' }}"
    "{%- else %}{{ '### Response:\\n' + message['content'] + '\\n<|EOT|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)

# Enough varied text for a few hundred merges: code, prose, non-ASCII (multi-byte merges).
_CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "import pandas as pd\ndf = pd.read_csv('data.csv')\nprint(df.head())\n",
    "### Instruction:\nplot revenue by month\n### Response:\n",
    "Execution result:\nTraceback (most recent call last):\nValueError: bad value\n",
    "for i in range(10):\n    print(i * i)\n",
    "The quick brown fox jumps over the lazy dog. Ünïcödé naïve café — 数据 表格 图\n",
    "```python\nimport matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()\n```\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
]


def build_tiny_model_dir(path: str | Path, *, vocab_size: int = 384, seed: int = 0) -> Path:
    """Write a tiny random LlamaForCausalLM + BPE tokenizer to ``path`` and return it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, PAD, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast_tokenizer: Any = PreTrainedTokenizerFast  # untyped in transformers
    tokenizer = fast_tokenizer(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, chat_template=CHAT_TEMPLATE
    )
    tokenizer.save_pretrained(out)

    shape: dict[str, Any] = dict(
        vocab_size=backend.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        rope_theta=100000.0,
        bos_token_id=backend.token_to_id(BOS),
        eos_token_id=backend.token_to_id(EOS),
        pad_token_id=backend.token_to_id(PAD),
        tie_word_embeddings=False,
    )
    config = LlamaConfig(**shape)  # rope_theta as in the published config.json (legacy key)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Random init at std 0.02 gives near-uniform logits, where argmax ties flip under tiny numeric
    # differences (batched vs. alone); a wider head makes greedy choices clear-cut.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(out)
    return out
