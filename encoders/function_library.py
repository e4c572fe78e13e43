"""A SavedModel's function library, where a TF2 module's ops live: its fingerprint by content, and how the baked
encoders keep their validation asserts out of conds.

TensorFlow's own fingerprint.pb hashes the outer graph and not this library (`functions_fingerprint` covers what it
misses); each `tf.cond` in it is two more functions every worker restores and optimises (`asserts_without_conds`).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator

from encoders.runtime import hub, tf

# isort: split
# TensorFlow's protos, and (private) what `asserts_without_conds` swaps for the time of a trace.
from tensorflow.core.framework import attr_value_pb2, function_pb2
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.eager import context as tf_context
from tensorflow.python.ops import control_flow_assert, gen_logging_ops

FINGERPRINT_FILE = "fingerprint.pb"  # written into every SavedModel by tf.saved_model.save since TF 2.12
# Attributes that name things rather than compute: a tensor's counter, a table's process-wide name, colocation.
_NAMING_ATTRS = ("_user_specified_name", "shared_name", "_class")


def functions_fingerprint(handle: str) -> str | None:
    """The SHA-256 (hex) of the bodies of a SavedModel's functions, each function named by its own content: what
    `encoder_fingerprint` misses. None for a folder without fingerprint.pb (there every file is hashed already).

    TensorFlow's graph_def_program_hash hashes the SavedModel's outer graph, not the function library where a TF2
    model's ops live: two modules with the same variables whose `__call__` computes `x * v * 2` and `x * v * 3` have
    the same fingerprint.pb, so a re-exported encoder with a changed preprocessing or activation would pass for the
    old one, and `--reuse` would copy vectors it no longer makes. Function names carry a per-process counter
    (`__inference_call_5028`), so each function is hashed with its name cleared and every call to another function
    replaced by that one's hash: the same model saved again hashes the same. Raises OSError / DecodeError.
    """
    path = hub.resolve(handle).rstrip("/")
    if not tf.io.gfile.exists(tf.io.gfile.join(path, FINGERPRINT_FILE)):
        return None
    saved_model = saved_model_pb2.SavedModel()
    with tf.io.gfile.GFile(tf.io.gfile.join(path, "saved_model.pb"), "rb") as handle_file:
        saved_model.ParseFromString(handle_file.read())
    library = {function.signature.name: function for meta_graph in saved_model.meta_graphs
               for function in meta_graph.graph_def.library.function}
    digests: dict[str, str] = {}

    def digest(name: str) -> str:
        if name not in digests:
            digests[name] = hashlib.sha256(_canonical_function(library[name], library, digest)).hexdigest()
        return digests[name]

    return hashlib.sha256("\n".join(sorted(digest(name) for name in library)).encode()).hexdigest()


def _canonical_function(original: function_pb2.FunctionDef, library: dict,
                        digest: Callable[[str], str]) -> bytes:
    """A FunctionDef serialised without what differs between two traces of the same code in two processes: its
    name, its arguments' and nodes' names (counters such as `key_value_init101`; replaced by their positions, in the
    order the trace made them), naming attributes, debug info, and the names of the functions it calls (their
    digests instead)."""
    function = function_pb2.FunctionDef()
    function.CopyFrom(original)
    function.signature.name = ""
    names: dict[str, str] = {}
    for position, arg in enumerate(function.signature.input_arg):
        names[arg.name] = arg.name = f"arg{position}"
    for position, node in enumerate(function.node_def):
        names[node.name] = node.name = f"node{position}"

    def renamed(reference: str) -> str:  # "name", "name:output:0" or "^name"
        control = "^" if reference.startswith("^") else ""
        base, colon, rest = reference.lstrip("^").partition(":")
        return control + names.get(base, base) + colon + rest

    for node in function.node_def:
        node.input[:] = [renamed(reference) for reference in node.input]
        node.ClearField("experimental_debug_info")  # the original names, counters included
        for attr in _NAMING_ATTRS:
            node.attr.pop(attr, None)
        if node.op in library:
            node.op = digest(node.op)
        for value in node.attr.values():
            _name_functions_by_digest(value, library, digest)
    for arg_attrs in function.arg_attr.values():
        for attr in _NAMING_ATTRS:
            arg_attrs.attr.pop(attr, None)
    for output, reference in list(function.ret.items()):
        function.ret[output] = renamed(reference)
    control_ret = {names.get(output, output): names.get(node, node) for output, node in function.control_ret.items()}
    function.ClearField("control_ret")
    function.control_ret.update(control_ret)
    function.signature.control_output[:] = [names.get(output, output) for output in function.signature.control_output]
    return function.SerializeToString(deterministic=True)


def _name_functions_by_digest(value: attr_value_pb2.AttrValue, library: dict,
                              digest: Callable[[str], str]) -> None:
    """An attribute's references to library functions (`f` of a call, the branches of an If...) → their digests."""
    for function_ref in ([value.func] if value.HasField("func") else []) + list(value.list.func):
        if function_ref.name in library:
            function_ref.name = digest(function_ref.name)
        for nested in function_ref.attr.values():
            _name_functions_by_digest(nested, library, digest)


@contextlib.contextmanager
def asserts_without_conds() -> Iterator[None]:
    """Graphs traced inside hold each `tf.debugging.assert_*` (ragged tensors' validation among them) as one Assert
    op, without the `tf.cond` TensorFlow puts around it when its data is not all int32 or strings.

    The cond spares a GPU copying that data to the host when the check passes; ragged tensors' int64 row partitions
    make every validation one. Each cond is two more functions in the SavedModel, restored and optimised by every
    worker that loads it: MiniLM's tokeniser had 47 (147 functions in all, 53 without), USE multilingual's 30 (139
    functions, 19 without). Without them, MiniLM loads in 0.92 s instead of 1.06 and its first call takes 1.30 s
    instead of 1.80; USE 1.36 and 0.91 s instead of 1.86 and 1.73. Tokenisation runs on the CPU, where there is no
    copy to spare, and the check is the same op, failing the same way. The swap is the process's, for as long as
    the block lasts: for bakes only.
    """
    guarded = control_flow_assert.Assert

    def unguarded(condition, data, summarize=None, name=None):
        if tf_context.executing_eagerly():
            return guarded(condition, data, summarize, name)
        with tf.name_scope(name or "Assert"):
            return gen_logging_ops._assert(condition, [tf.convert_to_tensor(value) for value in data], summarize,
                                           name="Assert")

    control_flow_assert.Assert = unguarded
    try:
        yield
    finally:
        control_flow_assert.Assert = guarded
