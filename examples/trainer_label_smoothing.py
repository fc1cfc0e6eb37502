"""Fine-tune a causal LM with the Hugging Face Trainer and lsx's exact label smoothing, fused with the LM head.

    python examples/trainer_label_smoothing.py                      # a tiny random Llama, offline, on CPU
    python examples/trainer_label_smoothing.py --model <name-or-path> # a real checkpoint and its tokenizer

The one line that matters is ``lsx.transformers.apply(model, label_smoothing=0.1, spread="others",
vocab_size=len(tokenizer))``, with the Trainer's ``label_smoothing_factor`` left at 0: HF's LabelSmoother
would spread ε over every row of the LM head (padded rows included), knows only the ε/K spread, and needs
the full logits; ``apply`` leaves the padded rows out, offers ε/(K−1), and never builds the logits in training.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import transformers

import lsx.transformers

CORPUS = [
    "the cat sat on the mat",
    "the dog sat on the log",
    "a cat and a dog met on the mat",
    "the log was warm and the mat was soft",
    "every dog likes a warm log",
    "the cat likes the soft mat",
    "a dog and a cat sat on a log",
    "the mat and the log were in the sun",
]


def tiny_model_and_tokenizer():
    """A word-level tokenizer built from the corpus and a 2-layer Llama with random weights whose head is
    padded to a multiple of 64 rows, as real checkpoints pad theirs (Qwen2: 151,936 rows, 151,665 tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({word for line in CORPUS for word in line.split()})
    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", "<s>", "</s>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    padded = -(-len(tokenizer) // 64) * 64
    config = transformers.LlamaConfig(
        vocab_size=padded,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config), tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a checkpoint name or path (default: a tiny random Llama, offline)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args()

    if args.model is None:
        model, tokenizer = tiny_model_and_tokenizer()
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    lsx.transformers.apply(model, label_smoothing=0.1, spread="others", vocab_size=len(tokenizer))

    examples = [tokenizer(line) for line in CORPUS]
    collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False)  # labels: −100 on padding
    with tempfile.TemporaryDirectory() as scratch:
        training = transformers.TrainingArguments(
            output_dir=args.output_dir or scratch,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,  # the loss is divided by the token count of both micro-batches
            per_device_eval_batch_size=4,
            max_steps=args.steps,
            learning_rate=3e-3,
            label_smoothing_factor=0.0,  # leave it at 0: lsx computes the smoothed loss
            logging_steps=max(1, args.steps // 5),
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = transformers.Trainer(
            model=model, args=training, train_dataset=examples, eval_dataset=examples, data_collator=collator
        )
        trainer.train()
        # eval mode returns the logits and the same smoothed loss, computed from them
        metrics = trainer.evaluate()
    print({name: round(value, 4) for name, value in metrics.items() if isinstance(value, float)})


if __name__ == "__main__":
    main()
