"""Tiny, randomly initialised captioning models built offline, saved the way a user's folder would be.

Each builder writes ``model.save_pretrained(folder)`` + ``processor.save_pretrained(folder)`` and
returns the folder. Tokenizers are built from in-memory vocabularies (a WordPiece vocab for BLIP, a
byte-level BPE trained here with ``tokenizers`` for OPT and Gemma 3): nothing is downloaded.
Sizes are tiny (hidden 32, 1 layer, 32×32 images) so a generate call takes milliseconds. The
captions are gibberish by construction; tests check paths, shapes, batching and provenance.

Note for transformers 5: pass ``vocab=``/``merges=`` (objects), not ``vocab_file=``/``merges_file=``,
which silently builds a near-empty tokenizer; :func:`check_tokenizer` guards that.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CORPUS = [
    "a chest ct slice of the lung with a small nodule",
    "the mediastinum and the heart are normal",
    "axial image of the thorax in a lung window",
    "describe this image please",
    "user model assistant",
    "question answer emphysema consolidation effusion",
] * 20
_WORDS = sorted({w for line in CORPUS for w in line.split()})
_VISION = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}


def check_tokenizer(tokenizer: object, minimum: int = 50) -> None:
    size = len(tokenizer)  # type: ignore[arg-type]
    assert size >= minimum, f"tokenizer has only {size} tokens: built from files it did not read?"


def byte_level_bpe(
    specials: list[str], vocab_size: int = 320
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-level BPE on the little corpus: (vocab, merges) for a GPT-2 style tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(CORPUS, trainer)
    raw = json.loads(bpe.to_str())["model"]["merges"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in raw]
    return bpe.get_vocab(), merges  # type: ignore[return-value]


def _save(model: torch.nn.Module, processor: object, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)  # type: ignore[attr-defined]
    processor.save_pretrained(folder)  # type: ignore[attr-defined]
    return folder


def build_blip(folder: Path, seed: int = 0) -> Path:
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip import BlipImageProcessorPil

    torch.manual_seed(seed)
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_WORDS])}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True)
    check_tokenizer(tokenizer, minimum=len(vocab))
    processor = BlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    config = BlipConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 37,
            "max_position_embeddings": 64,
            "bos_token_id": 2,
            "sep_token_id": 3,
            "pad_token_id": 0,
        },
        vision_config=_VISION,
        projection_dim=16,
    )
    return _save(BlipForConditionalGeneration(config).eval(), processor, folder)


def build_blip2_opt(folder: Path, seed: int = 0) -> Path:
    from tokenizers import processors
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, GPT2TokenizerFast
    from transformers.models.blip import BlipImageProcessorPil

    torch.manual_seed(seed)
    vocab, merges = byte_level_bpe(["<pad>", "</s>", "<unk>"])
    tokenizer = GPT2TokenizerFast(
        vocab=vocab, merges=merges, bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    # Like the real OPT tokenizer: every text starts with the BOS token </s>.
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", tokenizer.bos_token_id)]
    )
    check_tokenizer(tokenizer, minimum=200)
    processor = Blip2Processor(
        image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        num_query_tokens=4,
    )  # adds the <image> token
    config = Blip2Config(
        vision_config=_VISION,
        qformer_config={
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 37,
            "encoder_hidden_size": 32,
            "vocab_size": len(tokenizer),
        },
        text_config={
            "model_type": "opt",
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "ffn_dim": 37,
            "num_attention_heads": 2,
            "word_embed_proj_dim": 32,
            "max_position_embeddings": 128,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        num_query_tokens=4,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    return _save(Blip2ForConditionalGeneration(config).eval(), processor, folder)


def build_blip2_t5(folder: Path, seed: int = 0) -> Path:
    """BLIP-2 with a (Flan-)T5 encoder-decoder language model. The real Flan-T5 tokenizer is a
    SentencePiece model; a byte-level BPE stands in (the captioning code only calls the processor)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, GPT2TokenizerFast
    from transformers.models.blip import BlipImageProcessorPil

    torch.manual_seed(seed)
    vocab, merges = byte_level_bpe(["<pad>", "</s>", "<unk>"])
    tokenizer = GPT2TokenizerFast(
        vocab=vocab, merges=merges, eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    check_tokenizer(tokenizer, minimum=200)
    processor = Blip2Processor(
        image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        num_query_tokens=4,
    )
    config = Blip2Config(
        vision_config=_VISION,
        qformer_config={
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 37,
            "encoder_hidden_size": 32,
            "vocab_size": len(tokenizer),
        },
        text_config={
            "model_type": "t5",
            "vocab_size": len(tokenizer),
            "d_model": 32,
            "d_kv": 16,
            "d_ff": 37,
            "num_layers": 1,
            "num_decoder_layers": 1,
            "num_heads": 2,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "decoder_start_token_id": tokenizer.pad_token_id,
        },
        num_query_tokens=4,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    return _save(Blip2ForConditionalGeneration(config).eval(), processor, folder)


GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_gemma3(folder: Path, seed: int = 0) -> Path:
    """Gemma 3: the chat-style VLM whose processor works without torchvision in transformers 5
    (Qwen2-VL's and InternVL's processors build a torchvision video processor)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, GPT2TokenizerFast
    from transformers.models.gemma3 import Gemma3ImageProcessorPil

    torch.manual_seed(seed)
    vocab, merges = byte_level_bpe(
        [
            "<pad>",
            "<eos>",
            "<bos>",
            "<unk>",
            "<start_of_image>",
            "<end_of_image>",
            "<image_soft_token>",
            "<start_of_turn>",
            "<end_of_turn>",
        ]
    )
    tokenizer = GPT2TokenizerFast(
        vocab=vocab,
        merges=merges,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    check_tokenizer(tokenizer, minimum=200)
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        chat_template=GEMMA3_TEMPLATE,
        image_seq_length=4,
    )
    config = Gemma3Config(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "max_position_embeddings": 256,
            "sliding_window": 32,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config=_VISION,
        mm_tokens_per_image=4,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tokenizer.image_token_id,
    )
    return _save(Gemma3ForConditionalGeneration(config).eval(), processor, folder)


def build_bert(folder: Path) -> Path:
    """A text-only model folder: not a captioner."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37
    )
    folder.mkdir(parents=True, exist_ok=True)
    BertModel(config).save_pretrained(folder)
    return folder


def downgrade_blip2(
    folder: Path, *, config: bool = True, processor: bool = True, tokenizer: bool = True
) -> Path:
    """Turn a saved BLIP-2 folder back into the layout saved before transformers 4.47 (all three:
    legacy), or undo only some parts (half converted): ``config`` drops ``image_token_index`` from
    config.json; ``processor`` replaces processor_config.json by the old preprocessor_config.json
    (image processor only, no ``num_query_tokens``); ``tokenizer`` removes the ``<image>`` token."""
    if config:
        path = folder / "config.json"
        saved = json.loads(path.read_text())
        saved.pop("image_token_index", None)
        path.write_text(json.dumps(saved, indent=2))
    if processor:
        path = folder / "processor_config.json"
        image = json.loads(path.read_text())["image_processor"]
        (folder / "preprocessor_config.json").write_text(
            json.dumps({**image, "processor_class": "Blip2Processor"}, indent=2)
        )
        path.unlink()
    if tokenizer:
        path = folder / "tokenizer.json"
        saved = json.loads(path.read_text())
        saved["added_tokens"] = [t for t in saved["added_tokens"] if t["content"] != "<image>"]
        path.write_text(json.dumps(saved))
    return folder
