"""One session per backend (each installs only its extra and requires that backend), plus lint."""

import os

import nox

nox.options.reuse_existing_virtualenvs = True
TORCH = "torch==2.13.0"  # the version CI pins; any torch the `torch` extra admits works
#: an index to take torch from (e.g. https://download.pytorch.org/whl/cpu for the CPU-only build, since PyPI's
#: Linux torch is the CUDA build); unset: pip's configured indexes
TORCH_INDEX = os.environ.get("LSX_TORCH_INDEX")


def _tests(session: nox.Session, extra: str, backends: str, *pre: str) -> None:
    if pre:
        session.install(*pre, *(("--index-url", TORCH_INDEX) if TORCH_INDEX else ()))
    session.install("-e", f".[{extra},test]")
    session.run("python", "-m", "pytest", *session.posargs, env={"LSX_TEST_BACKENDS": backends})


@nox.session
def numpy(session: nox.Session) -> None:
    """NumPy without Numba: the pure-NumPy engine."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs, env={"LSX_TEST_BACKENDS": "numpy,numpy-pure"})


@nox.session
def numba(session: nox.Session) -> None:
    _tests(session, "numba", "numpy,numpy-pure")


@nox.session
def torch(session: nox.Session) -> None:
    _tests(session, "torch,numba,triton", "numpy,torch", TORCH)


@nox.session
def jax(session: nox.Session) -> None:
    _tests(session, "jax", "numpy,jax")


@nox.session
def tensorflow(session: nox.Session) -> None:
    _tests(session, "tensorflow", "numpy,tensorflow")


@nox.session
def keras(session: nox.Session) -> None:
    _tests(session, "keras,jax", "numpy,keras")


@nox.session
def all(session: nox.Session) -> None:
    """Every backend in one environment: what CI runs."""
    _tests(session, "all", "all", TORCH)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
