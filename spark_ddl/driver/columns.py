"""Which DataFrame columns feed the model, checked against the schema on the driver, and their
projection to the wire columns the agents and the scoring executors read.

``feature_cols`` is the one-input shorthand (the model gets one float32 matrix, positionally);
``inputs={"user": "user_id", ...}`` maps the model's keyword arguments to columns with their
types kept (see ``spark_ddl.common.batch_format``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from spark_ddl.common.batch_format import BOOL, FLOAT, INT, POSITIONAL_KEY, BatchSpec, InputField
from spark_ddl.common.wire import LABEL, VALIDATION, input_column
from spark_ddl.errors import ConfigError, SchemaError

_INTEGERS = (T.ByteType, T.ShortType, T.IntegerType, T.LongType)
_FLOATS = (T.FloatType, T.DoubleType, T.DecimalType)
_NUMERIC = (*_INTEGERS, *_FLOATS)
IMAGE_FIELDS = ("origin", "height", "width", "nChannels", "mode", "data")
_WIRE_TYPES = {INT: "bigint", FLOAT: "float", BOOL: "boolean"}


def _is_vector(data_type: T.DataType) -> bool:
    from pyspark.ml.linalg import VectorUDT

    return isinstance(data_type, VectorUDT)


def _is_image(data_type: T.DataType) -> bool:
    return isinstance(data_type, T.StructType) and set(IMAGE_FIELDS) <= set(data_type.fieldNames())


def _element_dtype(data_type: T.DataType) -> str | None:
    if isinstance(data_type, _INTEGERS):
        return INT
    if isinstance(data_type, _FLOATS):
        return FLOAT
    if isinstance(data_type, T.BooleanType):
        return BOOL
    return None


@dataclass(frozen=True)
class InputSource:
    """Where one model input comes from: its source column(s) and their form."""

    columns: tuple[str, ...]
    form: str  # "scalar" | "array" | "vector" | "columns" (numeric columns stacked) | "image"

    def describe(self) -> str:
        if self.form == "columns" and len(self.columns) > 1:
            return f"Feature columns {list(self.columns)}"
        return f"Feature column {self.columns[0]!r}" if len(self.columns) == 1 else f"Columns {list(self.columns)}"


@dataclass(frozen=True)
class ColumnSpec:
    """The model's inputs (with their sources) and the label."""

    batch: BatchSpec
    sources: tuple[InputSource, ...]  # one per batch.inputs, in order
    label_col: str | None
    label_is_array: bool = False
    label_is_integer: bool = False

    @classmethod
    def one_input(cls, feature_cols: Sequence[str], form: str, label_col: str | None) -> "ColumnSpec":
        """The one-input shorthand: ``feature_cols`` ("array", "vector" or "columns") as one float32 matrix."""
        source = InputSource(tuple(feature_cols), form)
        return cls(BatchSpec((_positional_field(source),), True), (source,), label_col)

    @property
    def feature_cols(self) -> tuple[str, ...]:
        """Every source column of every input."""
        return tuple(c for source in self.sources for c in source.columns)

    def without_label(self) -> "ColumnSpec":
        return replace(self, label_col=None)

    def with_batch(self, batch: BatchSpec) -> "ColumnSpec":
        return replace(self, batch=batch)

    def to_json_dict(self) -> dict[str, Any]:
        return {"batch": self.batch.to_json(), "sources": [[list(s.columns), s.form] for s in self.sources],
                "label_col": self.label_col, "label_is_array": self.label_is_array,
                "label_is_integer": self.label_is_integer}

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> "ColumnSpec":
        if "batch" not in data:  # saved before named inputs: one float matrix
            form = {"array": "array", "vector": "vector"}.get(data["feature_kind"], "columns")
            source = InputSource(normalize_feature_cols(data["feature_cols"]), form)
            return cls(BatchSpec((_positional_field(source),), True), (source,), data.get("label_col"),
                       bool(data.get("label_is_array")))
        sources = tuple(InputSource(tuple(cols), form) for cols, form in data["sources"])
        return cls(BatchSpec.from_json(data["batch"]), sources, data.get("label_col"),
                   bool(data.get("label_is_array")), bool(data.get("label_is_integer")))


def normalize_feature_cols(feature_cols: str | Sequence[str]) -> tuple[str, ...]:
    """Accept one column name or a list of them."""
    cols = (feature_cols,) if isinstance(feature_cols, str) else tuple(feature_cols or ())
    if not cols or not all(isinstance(c, str) and c for c in cols):
        raise ConfigError(
            f"feature_cols must be a column name or a non-empty list of names, got {feature_cols!r}."
        )
    return cols


def _positional_field(source: InputSource, shape: tuple[int, ...] | None = None) -> InputField:
    return InputField(POSITIONAL_KEY, input_column(0), "array", FLOAT, shape=shape)


def resolve_columns(
    schema: T.StructType, feature_cols: str | Sequence[str] | None, label_col: str | None,
    inputs: Mapping[str, str | Sequence[str]] | None = None, input_shapes: Mapping[str, Sequence[int]] | None = None,
    input_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> ColumnSpec:
    """Check that the columns exist and have usable types; say how to fix them if not."""
    fields = {f.name: f for f in schema.fields}
    shapes = {name: tuple(int(d) for d in shape) for name, shape in (input_shapes or {}).items()}
    options = dict(input_options or {})
    if inputs:
        names = list(inputs)
        sources = [_named_source(fields, name, inputs[name]) for name in names]
        unknown = sorted((set(shapes) | set(options)) - set(names))
        if unknown:
            raise ConfigError(f"input_shapes/input_options name {unknown}, which are not in inputs {names}.")
        batch = BatchSpec(tuple(_named_field(i, name, source, fields, shapes.get(name), options.get(name, {}))
                                for i, (name, source) in enumerate(zip(names, sources))), positional=False)
    else:
        source = _positional_source(fields, normalize_feature_cols(feature_cols or ["features"]))
        unknown = sorted((set(shapes) | set(options)) - {POSITIONAL_KEY})
        if unknown:
            raise ConfigError(f"input_shapes/input_options name {unknown}; with feature_cols the one input is "
                              f"called {POSITIONAL_KEY!r}.")
        sources, batch = [source], BatchSpec((_positional_field(source, shapes.get(POSITIONAL_KEY)),), True)
    label_is_array = label_is_integer = False
    if label_col:
        if label_col not in fields:
            raise SchemaError(f"Column(s) {[label_col]} not found in the DataFrame; available columns: "
                              f"{sorted(fields)}. Set feature_cols/label_col to existing columns.")
        ltype = fields[label_col].dataType
        label_is_array = _is_numeric_array(ltype)
        label_is_integer = isinstance(ltype, _INTEGERS)
        if not (isinstance(ltype, _NUMERIC) or label_is_array):
            raise SchemaError(
                f"Label column {label_col!r} has type {ltype.simpleString()}; it must be numeric "
                f"(or an array of numbers). Index string labels with StringIndexer first."
            )
    return ColumnSpec(batch, tuple(sources), label_col, label_is_array, label_is_integer)


def _missing(fields: Mapping[str, T.StructField], columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in fields]
    if missing:
        raise SchemaError(
            f"Column(s) {missing} not found in the DataFrame; available columns: "
            f"{sorted(fields)}. Set feature_cols/label_col/inputs to existing columns."
        )


def _positional_source(fields: Mapping[str, T.StructField], cols: tuple[str, ...]) -> InputSource:
    _missing(fields, cols)
    if len(cols) == 1 and _is_numeric_array(fields[cols[0]].dataType):
        return InputSource(cols, "array")
    if len(cols) == 1 and _is_vector(fields[cols[0]].dataType):
        return InputSource(cols, "vector")
    for c in cols:
        dtype = fields[c].dataType
        if not isinstance(dtype, _NUMERIC):
            hint = (
                "a list of feature columns must all be numeric scalars; assemble arrays or "
                "vectors with VectorAssembler first"
                if len(cols) > 1
                else "use a numeric column, an array of numbers or a pyspark.ml Vector"
            )
            raise SchemaError(
                f"Feature column {c!r} has type {dtype.simpleString()}, which is not numeric: "
                f"{hint} (e.g. index strings with StringIndexer, or cast the column)."
            )
    return InputSource(cols, "columns")


def _named_source(fields: Mapping[str, T.StructField], name: str, value: Any) -> InputSource:
    if not (isinstance(name, str) and name.isidentifier()):
        raise ConfigError(f"inputs keys are the model's keyword arguments; {name!r} is not a Python identifier.")
    if isinstance(value, (list, tuple)):
        return _positional_source(fields, normalize_feature_cols(list(value)))  # stacked numeric columns
    if not isinstance(value, str):
        raise ConfigError(f"inputs[{name!r}] must be a column name or a list of numeric columns, got {value!r}.")
    _missing(fields, [value])
    dtype = fields[value].dataType
    if _element_dtype(dtype) is not None:
        return InputSource((value,), "scalar")
    if isinstance(dtype, T.ArrayType) and _element_dtype(dtype.elementType) is not None:
        return InputSource((value,), "array")
    if _is_vector(dtype):
        return InputSource((value,), "vector")
    if _is_image(dtype):
        return InputSource((value,), "image")
    hint = ("index strings with StringIndexer or tokenise text into an array of token ids first"
            if isinstance(dtype, T.StringType) else
            "use numbers, booleans, numeric arrays, a pyspark.ml Vector or Spark's image struct")
    raise SchemaError(f"Input {name!r} reads column {value!r} of type {dtype.simpleString()}, which a model cannot "
                      f"take: {hint}.")


def _named_field(index: int, name: str, source: InputSource, fields: Mapping[str, T.StructField],
                 shape: tuple[int, ...] | None, options: Mapping[str, Any]) -> InputField:
    unknown = sorted(set(options) - {"max_length"})
    if unknown:
        raise ConfigError(f"input_options[{name!r}] has unknown option(s) {unknown}; known: ['max_length'].")
    max_length = options.get("max_length")
    if max_length is not None and not (isinstance(max_length, int) and max_length >= 1):
        raise ConfigError(f"input_options[{name!r}]['max_length'] must be a positive integer, got {max_length!r}.")
    column = input_column(index)
    if source.form == "scalar":
        dtype = _element_dtype(fields[source.columns[0]].dataType)
        return InputField(name, column, "scalar", dtype)
    if source.form == "image":
        return InputField(name, column, "image", FLOAT)
    if source.form == "array":
        dtype = _element_dtype(fields[source.columns[0]].dataType.elementType)
        if max_length is not None and shape is not None:
            raise ConfigError(f"input {name!r}: max_length (variable length) and input_shapes (fixed shape) "
                              "cannot both apply.")
        return InputField(name, column, "array", dtype, shape=shape, max_length=max_length,
                          ragged=max_length is not None)
    return InputField(name, column, "array", FLOAT, shape=shape)  # vector, stacked columns


def _is_numeric_array(dtype: T.DataType) -> bool:
    return isinstance(dtype, T.ArrayType) and isinstance(dtype.elementType, _NUMERIC)


def input_expression(field: InputField, source: InputSource) -> Column:
    """The wire column of one input, whatever its source form."""
    first = F.col(source.columns[0])
    if source.form == "scalar":
        return first.cast(_WIRE_TYPES[field.dtype])
    if source.form == "image":
        return F.struct(*(first[name].alias(name) for name in ("height", "width", "nChannels", "mode", "data")))
    if source.form == "vector":
        from pyspark.ml.functions import vector_to_array

        return vector_to_array(first, "float32")
    if source.form == "columns":
        return F.array(*[F.col(c).cast("float") for c in source.columns])
    values = first.cast(f"array<{_WIRE_TYPES[field.dtype]}>")
    return F.slice(values, 1, field.max_length) if field.max_length else values


def label_column(spec: ColumnSpec) -> Column:
    """The label: array<float>, bigint for integer columns, else double."""
    assert spec.label_col is not None
    if spec.label_is_array:
        return F.col(spec.label_col).cast("array<float>")
    return F.col(spec.label_col).cast("bigint" if spec.label_is_integer else "double")


def validation_column(
    schema: T.StructType, validation_col: str | None, validation_fraction: float, seed: int
) -> Column | None:
    """A boolean column marking validation rows, or None when there is no validation set."""
    if validation_col and validation_fraction:
        raise ConfigError("Set validation_col or validation_fraction, not both.")
    if validation_col:
        fields = {f.name: f for f in schema.fields}
        if validation_col not in fields:
            raise SchemaError(
                f"validation_col {validation_col!r} not found; available columns: {sorted(fields)}."
            )
        dtype = fields[validation_col].dataType
        if not isinstance(dtype, (T.BooleanType, *_NUMERIC)):
            raise SchemaError(
                f"validation_col {validation_col!r} has type {dtype.simpleString()}; it must be "
                "boolean (true = validation row)."
            )
        return F.coalesce(F.col(validation_col).cast("boolean"), F.lit(False))
    if validation_fraction:
        if not 0.0 < validation_fraction < 1.0:
            raise ConfigError(f"validation_fraction must be in (0, 1), got {validation_fraction}.")
        return F.rand(seed) < F.lit(validation_fraction)
    return None


def select_input_columns(df: DataFrame, spec: ColumnSpec) -> list[Column]:
    """The wire columns of every input."""
    return [input_expression(f, s).alias(f.column) for f, s in zip(spec.batch.inputs, spec.sources)]


def select_training_columns(df: DataFrame, spec: ColumnSpec, validation: Column | None = None) -> DataFrame:
    """Project the input to exactly the columns the agents read."""
    columns = select_input_columns(df, spec)
    if spec.label_col:
        columns.append(label_column(spec).alias(LABEL))
    if validation is not None:
        columns.append(validation.alias(VALIDATION))
    return df.select(*columns)


# ------------------------------------------------------------------ the same wire columns from pandas

_ARROW_TYPES = {INT: "int64", FLOAT: "float32", BOOL: "bool"}


def _list_column(cells: Any, dtype: str) -> Any:
    import numpy as np
    import pyarrow as pa

    rows = [np.asarray(c.toArray() if hasattr(c, "toArray") else c, dtype=_ARROW_TYPES[dtype]).reshape(-1)
            for c in cells]
    return pa.array(rows, type=pa.list_(pa.from_numpy_dtype(np.dtype(_ARROW_TYPES[dtype]))))


def pandas_input_column(field: InputField, source: InputSource, frame: Any) -> Any:
    """The wire column of one input (a pyarrow array, what ``input_expression`` makes in Spark)
    from a pandas frame holding the source columns: scalars, sequences or pyspark Vectors,
    stacked numeric columns, or image structs (dicts)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    missing = [c for c in source.columns if c not in frame.columns]
    if missing:
        raise SchemaError(f"Column(s) {missing} not found in the input; the model reads {list(source.columns)} "
                          f"(available: {sorted(map(str, frame.columns))}).")
    first = frame[source.columns[0]]
    if source.form == "scalar":
        return pa.array(first.to_numpy()).cast(_ARROW_TYPES[field.dtype])
    if source.form == "image":
        parts = ("height", "width", "nChannels", "mode", "data")
        return pa.array([{name: cell[name] for name in parts} for cell in first],
                        type=pa.struct([("height", pa.int32()), ("width", pa.int32()), ("nChannels", pa.int32()),
                                        ("mode", pa.int32()), ("data", pa.binary())]))
    if source.form == "columns":
        matrix = np.stack([frame[c].to_numpy(dtype=np.float32) for c in source.columns], axis=1)
        return _list_column(matrix, FLOAT)
    values = _list_column(first, field.dtype if source.form == "array" else FLOAT)
    return pc.list_slice(values, 0, field.max_length) if field.max_length else values
