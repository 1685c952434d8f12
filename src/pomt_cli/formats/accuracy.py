"""The accuracy profile file: its columns, its metadata, its one reader, its estimators and its file name."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import polars as pl
from pydantic import AfterValidator, BaseModel, Field

from pomt_cli.formats.common import ProfileMeta, check_listed, read_checked
from pomt_cli.formats.outputs import layers_part, output_stem
from pomt_cli.names import RANDOM
from pomt_cli.pruning import method_names
from pomt_cli.pruning.registry import Method
from pomt_cli.pruning.registry import get as get_method


def estimators() -> tuple[str, ...]:
    """``random``, then every registered method that reduces tokens (``pomt``, ``tome``, ``topk``)."""
    return (RANDOM, *(m for m in method_names() if get_method(m).reduces))


def estimator_method(estimator: str) -> Method | None:
    """The pruning method behind an estimator (None for ``random``)."""
    return None if estimator == RANDOM else get_method(estimator)


def takes_layer(estimator: str) -> bool:
    """Whether the estimator's curves are per block ``layer`` (POMT's)."""
    method = estimator_method(estimator)
    return method is not None and method.takes_layer


def _check_name(estimator: str) -> str:
    if estimator not in estimators():
        raise ValueError(f"unknown estimator {estimator!r}: use one of {', '.join(estimators())}")
    return estimator


Estimator = Annotated[str, AfterValidator(_check_name)]


FRAME_SCHEMA = {
    "tokens": pl.Int64,
    "accuracy": pl.Float64,
    "top5": pl.Float64,
    "images": pl.Int64,
    "correct": pl.Int64,
    "correct_top5": pl.Int64,
    "block_tokens": pl.List(pl.Int64),
    "layer": pl.Int64,
}


class SkippedImage(BaseModel):
    image: str
    reason: str


class DuplicateImage(BaseModel):
    """An image file that folder links showed twice: counted once, as ``counted_as``."""

    image: str
    counted_as: str


class AccuracyMeta(ProfileMeta):
    """Metadata of an accuracy profile (see docs/FORMATS.md).

    pomt's own writer fills every field; they are None in a profile that another tool
    wrote with the common fields only (:class:`ProfileMeta`).
    """

    kind: Literal["accuracy"] = "accuracy"
    estimator: Estimator | None = None
    layer: int | None = Field(None, description="POMT's pruning block (the first of layers); None for the other estimators")
    layers: list[int] | None = Field(None, description="POMT's pruning blocks, one curve each; None for the others")
    seed: int | None = None
    weights: str | None = Field(None, description="pretrained, checkpoint, bundled or random")
    weights_file: str | None = None
    weights_sha256: str | None = None
    data: str | None = Field(None, description="the data folder (absolute) or 'digits'")
    num_images: int | None = Field(None, description="images evaluated (readable ones)")
    num_classes: int | None = None
    limit: int | None = None
    images_available: int | None = None
    skipped: list[SkippedImage] | None = None
    duplicates: list[DuplicateImage] | None = Field(
        None, description="image files reached again through folder links, left out (None: written before 2026-11-28)")
    images_sha256: str | None = Field(None, description="SHA-256 of the evaluated image names, one per line, in order")
    images: list[str] | None = None
    preprocessing: dict | None = None
    batch_size: int | None = None
    device_type: str | None = None

    def check_rows(self, path: Path, frame: pl.DataFrame) -> None:
        """Check also that the rows' layers are the metadata's ``layers``.

        Raises:
            PomtError: one line naming the file, the column and both sets of values.
        """
        super().check_rows(path, frame)
        check_listed(path, "layers", set(frame["layer"].drop_nulls().to_list()), self.layers, True)


def read_accuracy(path: str | Path) -> tuple[pl.DataFrame, AccuracyMeta]:
    """The frame and metadata of an accuracy profile file, checked strictly.

    Raises:
        PomtError: the file is missing, not a pomt accuracy profile, or damaged.
    """
    return read_checked(path, AccuracyMeta)


def accuracy_stem(meta: AccuracyMeta) -> str:
    """The file stem of an accuracy profile: model, dtype, estimator (and POMT's layer), data set."""
    estimator = layers_part(meta.estimator, meta.layers or [meta.layer]) if takes_layer(meta.estimator) else meta.estimator
    data_name = Path(meta.data).name if meta.data != "digits" else "digits"
    return output_stem("accuracy", meta.model, dtype=meta.dtype, img_size=meta.img_size_option,
                       extra=(estimator, data_name))
