"""A fusion written outside the repository type-checks against qalgebra as ``pip install`` ships it.

qalgebra is installed (not editable) into a throwaway virtual environment whose only other
path is this interpreter's site-packages (torch, pyrsistent, ...); a fusion file in a fresh
directory is checked with ``mypy --strict`` and no configuration. The file passes, and the same
file with one mistake -- a ``float`` bound in the match passed where the op takes a graph node
-- is refused at that argument: the operator stubs ship with the package (``qalgebra/opstubs/``)
and type ``qalgebra.emit``, rather than leaving it ``Any``.

Measured: about 12 s on a quiet machine (mypy reads torch's annotations; the cache is fresh).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

FUSION = textwrap.dedent(
    '''\
    """A user's fusion: quantized relu -> a oneDNN call (the arguments only need to type-check)."""

    import torch
    from torch import fx

    from qalgebra import Fusion, Match, Rewriter, Var, call, emit, require
    from qalgebra.checks import dtype_in
    from qalgebra.combinators import dequantize_per_tensor, quantize_per_tensor
    from qalgebra.qparams import qparams

    X = Var("x", fx.Node)
    XQ = qparams("x")
    OQ = qparams("out")


    def _rewrite(m: Match, rw: Rewriter) -> fx.Node:
        require(dtype_in(XQ.dtype, (torch.uint8,)), m)
        return emit.onednn.qlinear_pointwise.default(
            rw,
            qx=m[X],
            x_scale=m[XQ.scale],
            x_zero_point=m[XQ.zero_point],
            qw=m[X],
            w_scale=m[X],
            w_zero_point=m[X],
            bias=None,
            output_scale=m[OQ.scale],
            output_zero_point=m[OQ.zero_point],
            output_dtype=m[OQ.dtype],
            post_op_name="none",
            post_op_args=[],
            post_op_algorithm="",
        )


    MY_FUSION = Fusion(
        "my_relu",
        "mine",
        quantize_per_tensor(call(torch.ops.aten.relu.default, dequantize_per_tensor(X, XQ)), OQ),
        _rewrite,
    )
    '''
)
MISTAKE = ("        qx=m[X],\n", "        qx=m[XQ.scale],\n")


def _installed_environment(root: Path) -> Path:
    """A venv holding qalgebra built from a copy of the sources; its python."""
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "qalgebra", source / "qalgebra", ignore=shutil.ignore_patterns("*.pyc"))
    env = root / "env"
    venv.create(env, system_site_packages=False, with_pip=False)
    python = env / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-compile", "--target", site, str(source)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    # qalgebra's dependencies: this interpreter's (torch's annotations are what mypy reads).
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    assert (Path(site) / "qalgebra" / "opstubs" / "emit" / "onednn.pyi").is_file()
    return python


def test_a_fusion_outside_the_repo_type_checks_against_the_installed_package(
    tmp_path: Path,
) -> None:
    pytest.importorskip("mypy")
    python = _installed_environment(tmp_path)
    user = tmp_path / "user"
    user.mkdir()
    (user / "my_fusion.py").write_text(FUSION)
    assert FUSION.count(MISTAKE[0]) == 1
    (user / "bad_fusion.py").write_text(FUSION.replace(*MISTAKE))
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary",
         "--python-executable", str(python), "--cache-dir", str(tmp_path / "cache"),
         "my_fusion.py", "bad_fusion.py"],
        cwd=user, capture_output=True, text=True,
    )  # fmt: skip
    report = result.stdout + result.stderr
    assert result.returncode == 1, report  # errors found; 2 would be a crash or a usage error
    errors = re.findall(r"^(\w+\.py):(\d+): error: (.*)$", report, re.M)
    bad_line = FUSION.splitlines().index(MISTAKE[0].rstrip("\n")) + 1
    assert errors == [
        (
            "bad_fusion.py",
            str(bad_line),
            'Argument "qx" to "__call__" of "qlinear_pointwise__default" has incompatible type '
            '"float"; expected "Node"  [arg-type]',
        )
    ], report
