"""The CXR-BERT vocabulary of CT-CLIP's text encoder, checked by content before it is used.

CT-CLIP's BERT was trained with CXR-BERT's WordPiece vocabulary (``vocab.txt`` of
``microsoft/BiomedVLP-CXR-BERT-specialized``, 30522 entries). Other BERT vocabularies have the
same size (``bert-base-uncased`` too) but give other token ids, so the prompts would be encoded
wrongly and every probability would be wrong, with no error. Size alone proves nothing. What is
checked, always (the tiny test vocabularies follow the same layout):

* the file reads as UTF-8, one token per line, no empty line, no token twice;
* the special tokens sit where CXR-BERT has them: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4
  (Google's BERT vocabularies put [PAD] at 0, [unused0..98] after it, [UNK] at 100);
* the number of entries equals the model's ``vocab_size`` (when the caller knows it);
* the tokenizer built from the file has exactly those entries and those special ids (transformers 5
  builds a 5-token tokenizer, silently, from arguments it does not read).

The file's sha256 is compared by the caller with the value pinned in ``weights/manifest.yaml``
(:func:`sha256_problem`): only a checksum tells two vocabularies with the same layout apart.

Nothing here imports transformers except :func:`build_tokenizer`, so ``check-config`` stays quick.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from processor.errors import WeightsError

if TYPE_CHECKING:
    from transformers import BertTokenizer

CXR_BERT = "microsoft/BiomedVLP-CXR-BERT-specialized"
CXR_BERT_SIZE = 30522
SPECIAL_IDS: Mapping[str, int] = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
FIX = (
    f"Fix: use the vocab.txt of {CXR_BERT} ({CXR_BERT_SIZE} lines), e.g. "
    f"`huggingface-cli download {CXR_BERT} vocab.txt`, and check it with `python run.py weights --verify`."
)


def read_vocab(path: Path) -> list[str]:
    """The tokens of a BERT vocab.txt in id order (line n = id n), as BERT reads them."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise WeightsError(
            f"tokenizer vocabulary {path} not found; it is not part of the CT-CLIP .pt file. {FIX}"
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise WeightsError(
            f"tokenizer vocabulary {path} cannot be read as UTF-8 text ({exc}). {FIX}"
        ) from exc
    # Only "\n" ends a line: BERT vocabularies hold characters that str.splitlines() would split on.
    tokens = text.split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()
    return [token.removesuffix("\r") for token in tokens]


def layout_problems(tokens: list[str], expected_size: int | None = None) -> list[str]:
    """What makes ``tokens`` unlike CXR-BERT's layout (empty when it matches)."""
    problems = []
    if expected_size is not None and len(tokens) != expected_size:
        problems.append(f"it has {len(tokens)} entries but the model's text encoder has {expected_size}")
    misplaced = [
        f"{name} at line {tokens.index(name) + 1} (id {tokens.index(name)})"
        if name in tokens
        else f"{name} missing"
        for name, want in SPECIAL_IDS.items()
        if want >= len(tokens) or tokens[want] != name
    ]
    if misplaced:
        google = (
            " (it has [unused0] entries: the layout of Google's BERT vocabularies such as bert-base-uncased)"
            if "[unused0]" in tokens
            else ""
        )
        want = " ".join(f"{name}={i}" for name, i in SPECIAL_IDS.items())
        problems.append(
            f"its special tokens are not where CXR-BERT has them ({want}): {', '.join(misplaced)}, "
            f"so every token id would differ from the ones CT-CLIP was trained with{google}"
        )
    empty = [n + 1 for n, token in enumerate(tokens) if not token.strip()]
    if empty:
        problems.append(f"line(s) {', '.join(map(str, empty[:5]))} are empty")
    twice = [token for token, count in Counter(tokens).items() if count > 1]
    if twice:
        problems.append(f"token(s) {', '.join(map(repr, twice[:5]))} appear more than once")
    return problems


def check_vocab(path: Path, expected_size: int | None = None) -> list[str]:
    """Problems of the vocabulary file at ``path`` (empty when it has CXR-BERT's layout)."""
    problems = layout_problems(read_vocab(path), expected_size)
    return [f"vocabulary {path} is not CXR-BERT's: {'; '.join(problems)}. {FIX}"] if problems else []


def sha256_problem(
    path: Path, actual: str, pinned: str | None, manifest: str = "weights/manifest.yaml"
) -> str | None:
    """A message when the file's sha256 differs from the one the manifest pins, else None."""
    if pinned is None or actual == pinned:
        return None
    return (
        f"vocabulary {path} has sha256 {actual}, but {manifest} pins {pinned} for it: it is not the "
        f"vocabulary CT-CLIP was trained with. {FIX} If you pinned that checksum yourself, pin the "
        "sha256 of the copy you trust."
    )


def build_tokenizer(vocab: str | Path, expected_size: int | None = None) -> BertTokenizer:
    """CT-CLIP's WordPiece tokenizer (lower-casing) from a CXR-BERT vocab.txt, checked by content.

    WeightsError, naming the fix, when the file is missing or does not have CXR-BERT's layout.
    """
    from transformers import BertTokenizer

    path = Path(vocab)
    tokens = read_vocab(path)
    problems = layout_problems(tokens, expected_size)
    if problems:
        raise WeightsError(f"vocabulary {path} is not CXR-BERT's: {'; '.join(problems)}. {FIX}")
    # The token → id map is passed in, never the file name: transformers 5 ignores vocab_file=
    # (a 5-token tokenizer) and reads a vocab= path with a deprecated tokenizers call.
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(tokens)}, do_lower_case=True)
    built = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_IDS}
    if len(tokenizer) != len(tokens) or built != dict(SPECIAL_IDS):
        raise WeightsError(
            f"the tokenizer built from {path} has {len(tokenizer)} tokens and special ids {built}, "
            f"expected {len(tokens)} and {dict(SPECIAL_IDS)}: this transformers version builds BERT "
            "tokenizers differently. Fix: install the transformers version pyproject.toml names."
        )
    return tokenizer
