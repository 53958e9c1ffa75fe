"""
Compare our tokenizer's compression (bytes per token) with GPT-2's and GPT-4's on fixed samples.

    python -m scripts.tok_eval
"""

from nanochat.common import make_parser
from nanochat.dataset import parquets_iter_batched
from nanochat.download import DownloadError
from nanochat.report import get_report
from nanochat.tokenizer import RustBPETokenizer, get_tokenizer

NEWS = """The city council voted 7 to 2 on Tuesday to approve a new light-rail line connecting the
airport with the downtown business district. Construction is expected to begin next spring and
to cost about $1.4 billion, funded jointly by state and federal grants. Supporters said the line
would cut commute times by a third; opponents warned of years of disruption for local shops."""

CODE = '''def merge_sorted(a: list[int], b: list[int]) -> list[int]:
    """Merge two sorted lists into one sorted list in linear time."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i]); i += 1
        else:
            out.append(b[j]); j += 1
    return out + a[i:] + b[j:]
'''

MATH = r"""Let $f(x) = 3x^2 - 12x + 7$. Completing the square, $f(x) = 3(x - 2)^2 - 5$, so the
minimum value is $-5$, attained at $x = 2$. For the integral,
$\int_0^1 x^3\,dx = \left[\frac{x^4}{4}\right]_0^1 = \frac{1}{4}$, and $\sum_{k=1}^{n} k = \frac{n(n+1)}{2}$."""

SCIENCE = """Photosynthesis converts light energy into chemical energy. In the thylakoid membranes,
chlorophyll absorbs photons, splitting water molecules and releasing oxygen; the energy drives
the synthesis of ATP and NADPH, which the Calvin cycle then uses to fix carbon dioxide into
three-carbon sugars such as glyceraldehyde-3-phosphate."""

KOREAN = """서울은 대한민국의 수도이며 인구는 약 천만 명이다. 한강이 도시를 가로질러 흐르고, 오래된 궁궐과
현대적인 고층 건물이 함께 어우러져 있다. 봄에는 벚꽃이 피고 가을에는 단풍이 아름답다."""


def samples():
    fixed = {"news": NEWS, "code": CODE, "math": MATH, "science": SCIENCE, "korean": KOREAN}
    fixed["fwe-train"] = next(parquets_iter_batched("train"))[0]
    fixed["fwe-val"] = next(parquets_iter_batched("val"))[0]
    return fixed


parser = make_parser(description=__doc__.strip().split("\n\n")[0])


def main():
    parser.parse_args()
    try:
        tokenizers = {"gpt2": RustBPETokenizer.from_pretrained("gpt2"), "gpt4": RustBPETokenizer.from_pretrained("cl100k_base"), "ours": get_tokenizer()}
        texts = samples()
    except (FileNotFoundError, ValueError, DownloadError) as e:
        raise SystemExit(f"error: {e}")
    header = f"| {'text':<10} | {'bytes':>7} | " + " | ".join(f"{name} tokens | {name} bytes/token" for name in tokenizers) + " |"
    rows = [header, "|" + "---|" * (2 + 2 * len(tokenizers))]
    results = {}
    for label, text in texts.items():
        nbytes = len(text.encode("utf-8"))
        cells = [f"{label:<10}", f"{nbytes:>7}"]
        for name, tok in tokenizers.items():
            ids = tok.encode(text)
            assert tok.decode(ids) == text, f"{name} does not round-trip {label}"
            results[f"{label}/{name}"] = nbytes / len(ids)
            cells += [f"{len(ids)}", f"{nbytes / len(ids):.2f}"]
        rows.append("| " + " | ".join(cells) + " |")
    table = "\n".join(rows)
    print("Bytes per token (higher = better compression); vocab sizes: "
          + ", ".join(f"{n} {t.get_vocab_size():,}" for n, t in tokenizers.items()))
    print(table)
    get_report().log(section="Tokenizer evaluation", data=[table])
    return results


if __name__ == "__main__":
    main()
