"""Do two checkouts compile prefix_attention's kernels to the same instructions?

    python scripts/same_kernel_code.py OTHER_CHECKOUT [--arch 90]

Records the launches of two attention variants (gate + mask + causal + attn_bias; dropout
alone), fp16 D=64, with ``unipelt_fast.resources``' recorders (no GPU needed), compiles
each kernel for the arch with Triton's compiler in this checkout and in OTHER_CHECKOUT, and
compares the PTX with the parameter list, comments and debug sections removed (a new
constexpr flag adds unused parameters, and the file path is in the debug info). Used to
check that a flag that is off compiles to the code from before the flag (e.g. softcap,
sinks and window against the commit before them). Exit status 1 if any kernel differs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

_DUMP = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from unipelt_fast import resources as r
out, arch = sys.argv[1], int(sys.argv[2])
variants = [(True, True, True, True, False), (False, False, False, False, True)]
for i, (gate, mask, causal, bias, dropout) in enumerate(variants):
    launches = []
    with r._recording(launches, arch):
        r._attention_case("fp16", 64, gate, mask, causal, bias, dropout).run()
    seen = set()
    for name, fn, a, k in launches:
        if name in seen or name not in ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"):
            continue
        seen.add(name)
        options, sig, cx, attrs = r._specialise(fn, a, k, arch)
        ck = triton.compile(ASTSource(fn, sig, cx, attrs), target=GPUTarget("cuda", arch, 32),
                            options=options)
        open(os.path.join(out, f"{i}_{name}.ptx"), "w").write(ck.asm["ptx"])
"""


def _normalised(ptx: str) -> list[str]:
    body = ptx.split(".section\t.debug")[0]
    skip = ("param", ".loc", ".file")
    return [
        line
        for line in body.splitlines()
        if not line.strip().startswith("//") and not any(s in line for s in skip)
    ]


def _dump(tree: str, out: str, arch: int) -> None:
    env = {**os.environ, "PYTHONPATH": tree, "TRITON_DEFAULT_FP_FUSION": "1"}
    env.pop("TRITON_INTERPRET", None)
    subprocess.run([sys.executable, "-c", _DUMP, out, str(arch)], cwd=tree, env=env, check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("other", help="another checkout of this repository")
    p.add_argument("--arch", type=int, default=90)
    args = p.parse_args(argv)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        _dump(here, a, args.arch)
        _dump(os.path.abspath(args.other), b, args.arch)
        names = sorted(os.listdir(a))
        differ = 0
        for n in names:
            with open(os.path.join(a, n)) as fa, open(os.path.join(b, n)) as fb:
                same = _normalised(fa.read()) == _normalised(fb.read())
            differ += not same
            print(f"{n}: {'same' if same else 'DIFFERENT'}")
    return 1 if differ or not names else 0


if __name__ == "__main__":
    sys.exit(main())
