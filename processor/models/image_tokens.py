"""Image placeholder tokens in captioner prompts: the BLIP-2 folder layout, and a guard at generation.

A BLIP-2 model sees the image only through placeholder tokens in ``input_ids``. In transformers 5
(``Blip2Processor`` and ``Blip2ForConditionalGeneration.generate``):

* the processor prepends ``num_query_tokens`` copies of its image token (``<image>``) to every
  text, and only when its own ``num_query_tokens`` is set (``processor_config.json``); it adds
  ``<image>`` to a tokenizer that lacks it, at a new id;
* the model writes the Q-Former's output over the positions whose id is ``image_token_index``
  (``config.json``). When that is missing, ``generate`` fails with "'bool' object has no attribute
  'unsqueeze'"; when the processor put no such token in the prompt, it generates text from the
  prompt alone, without the image, and says nothing.

Folders saved before transformers 4.47's BLIP-2 update lack both settings (legacy); copies
updated by hand often lack one (half converted). :func:`blip2_folder_problems` names what is
wrong (for ``check-config``); :func:`check_image_tokens` refuses, at every generate call, a prompt
without the image tokens the model expects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from processor.errors import StepError, WeightsError

BLIP2_FIX = (
    "Fix: download the model folder again from Hugging Face (the BLIP-2 repositories were updated "
    "to this layout in 2024), or update this copy once with transformers: processor = "
    "AutoProcessor.from_pretrained(folder); model = Blip2ForConditionalGeneration.from_pretrained(folder); "
    "processor.num_query_tokens = model.config.num_query_tokens; "
    "model.resize_token_embeddings(len(processor.tokenizer)); model.config.image_token_index = "
    "processor.tokenizer.convert_tokens_to_ids('<image>'); then processor.save_pretrained(folder) "
    "and model.save_pretrained(folder)."
)


def blip2_problems(processor: Any, config: Any) -> list[str]:
    """What stops this processor and model config from putting the image into the prompt."""
    problems = []
    index = config.image_token_index
    wanted = int(config.num_query_tokens)
    given = getattr(processor, "num_query_tokens", None)
    if index is None:
        problems.append(
            "config.json has no image_token_index, so the model cannot find the image in the prompt "
            "(transformers fails with \"'bool' object has no attribute 'unsqueeze'\")"
        )
    if given is None:
        problems.append(
            "the processor has no num_query_tokens (processor_config.json lacks it, or is absent), so it "
            "puts no image tokens into the prompt and the model would caption the text alone, without the image"
        )
    elif int(given) != wanted:
        problems.append(
            f"the processor's num_query_tokens is {given} but the model's is {wanted} "
            "(config.json num_query_tokens)"
        )
    token = str(getattr(processor, "image_token", "<image>"))
    token_id = processor.tokenizer.convert_tokens_to_ids(token)
    if index is not None and token_id != index:
        problems.append(
            f"the tokenizer's {token} token has id {token_id} but config.json's image_token_index is "
            f"{index} (a tokenizer saved without {token} gets it appended at load, at a new id)"
        )
    vocab = getattr(config.text_config, "vocab_size", None)
    if index is not None and vocab is not None and index >= vocab:
        problems.append(
            f"image_token_index {index} is outside the language model's {vocab} token embeddings "
            "(resize_token_embeddings was not run)"
        )
    if not problems:  # the settings agree: the processor must also do what they say
        try:
            found = list(processor(images=[_blank()], text=[""])["input_ids"][0]).count(index)
        except (ValueError, TypeError, KeyError) as exc:
            return [f"the processor fails on an image with an empty prompt ({exc})"]
        if found != wanted:
            problems.append(
                f"the processor puts {found} image tokens into a prompt, the model expects {wanted}"
            )
    return problems


def blip2_folder_problems(folder: Path) -> list[str]:
    """:func:`blip2_problems` of a saved folder, reading only its config and processor (no weights)."""
    import transformers

    try:
        config = transformers.Blip2Config.from_pretrained(str(folder), local_files_only=True)
        processor = transformers.AutoProcessor.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, AttributeError) as exc:
        raise WeightsError(
            f"{folder}: cannot load the BLIP-2 config and processor ({exc}). {BLIP2_FIX}"
        ) from exc
    problems = blip2_problems(processor, config)
    if not problems:
        return []
    return [
        f"{folder}: this BLIP-2 folder cannot show the image to the model: {'; '.join(problems)}. {BLIP2_FIX}"
    ]


def check_image_tokens(family: str, config: Any, input_ids: Any, folder: Path) -> None:
    """StepError unless every prompt row carries the image tokens the model reads the image from.

    BLIP-2: exactly ``num_query_tokens`` tokens of id ``image_token_index`` per row. Chat VLMs
    whose config names an image token: at least one per row. BLIP (cross-attention) has none.
    """
    if family == "blip":
        return
    index = getattr(config, "image_token_index", None)
    if index is None:
        index = getattr(config, "image_token_id", None)
    if family == "blip-2":
        wanted = int(config.num_query_tokens)
        counts = [] if index is None or input_ids is None else (input_ids == index).sum(dim=1).tolist()
        if index is None or input_ids is None or any(c != wanted for c in counts):
            raise StepError(
                f"{folder}: the prompt holds {counts or 'no'} image token(s) per image where the model "
                f"expects {wanted}, so the caption would not describe the image; nothing was "
                f"generated. {BLIP2_FIX}"
            )
        return
    if index is not None and input_ids is not None:
        counts = (input_ids == index).sum(dim=1).tolist()
        if min(counts) < 1:
            raise StepError(
                f"{folder}: a prompt holds no image token (id {index}; counts {counts}), so the caption "
                "would not describe the image; nothing was generated. Fix: use the processor saved "
                "with the model (processor.save_pretrained into the same folder)."
            )


def _blank() -> Any:
    from PIL import Image

    return Image.new("RGB", (8, 8))
