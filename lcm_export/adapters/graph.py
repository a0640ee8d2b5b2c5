"""Low-rank adapter branches in an exported graph: style LoRAs applied per call, without a rebuild.

For every Linear layer and every 1x1 convolution of a component (the layers a style LoRA changes,
found through the weight map that export records), the graph gets a branch beside the layer's own
product, fed by three run-time inputs:

    MatMul / Gemm   y = x·Wᵀ (+ b)          ->  y + ((x · A) ⊙ s) · B      A [in, r], B [r, out], s [r]
    Conv 1x1        y = W * x (+ b)         ->  y + B · ((A · x) ⊙ s)      A [r, in], B [out, r], s [r]
                                                (over the channels of x viewed as [N, in, H·W])

Each layer's rank ``r`` is its own dynamic dimension: the runtime feeds the adapters' factors
concatenated along the rank (several adapters at once add up; each one's alpha/rank is folded into its
B when it is added) and ``s`` holds each rank's λ, so changing a weight changes only ``s``; one adapter's
prepared factors are fed as they are (a set of several is concatenated once); rank 0 (empty factors) where no adapter touches the
layer adds exactly zero.
3x3 convolutions get no branch: OpenVINO's CPU plugin cannot compile a convolution whose weights
have a dynamic shape, and a branch of fixed rank would cost its full rank on every call; a LoRA
with 3x3 layers (LoCon) is baked into an entry with ``build-engine --lora`` instead.

Pure onnx + numpy; the table of branches (``layers``) goes into the manifest, so the runtime never
reads the graph.
"""

from __future__ import annotations

from pathlib import Path

from .spec import INPUT_PREFIX, RANK_AXIS  # noqa: F401 (the layouts live with the rest of the spec)


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            import onnx

            return onnx.helper.get_attribute_value(a)
    return default


def _branchable(node, dims: list[int]) -> str | None:
    """The branch kind for ``node`` using a weight of shape ``dims``, or None."""
    if node.op_type == "MatMul" and len(dims) == 2 and node.input[1]:
        return "matmul"
    if node.op_type == "Gemm" and len(dims) == 2 and _attr(node, "transB", 0) == 1 and _attr(node, "transA", 0) == 0 \
            and _attr(node, "alpha", 1.0) == 1.0:
        return "matmul"
    if node.op_type == "Conv" and len(dims) == 4 and dims[2:] == [1, 1] and _attr(node, "group", 1) == 1 \
            and all(v == 1 for v in _attr(node, "strides", [1, 1])) and not any(_attr(node, "pads", [0, 0, 0, 0])) \
            and all(v == 1 for v in _attr(node, "dilations", [1, 1])):
        return "conv1x1"
    return None


def add_branches(src: Path, dst: Path, weight_map: dict, component: str) -> list[dict]:
    """Write ``src`` with a branch beside every branchable layer of ``weight_map`` to ``dst`` (weights
    stay where they were: external data is shared by name); return the branch table, one row per layer:
    {"module", "kind", "in", "out", "inputs": [A name, B name, s name]}."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(src), load_external_data=False)
    g = model.graph
    dims = {t.name: list(t.dims) for t in g.initializer}
    users: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    rows, new_nodes = [], {}
    for key, entry in sorted(weight_map["weights"].items()):
        init = entry["initializer"]
        nodes = users.get(init, [])
        if len(nodes) != 1 or len(nodes[0].input) < 2 or nodes[0].input[1] != init:
            continue
        node, d = nodes[0], dims[init]
        kind = _branchable(node, d)
        if kind is None:
            continue
        i = len(rows)
        a_name, b_name, s_name = (f"{INPUT_PREFIX}.{component}.{i}.{part}" for part in ("A", "B", "s"))
        if kind == "matmul":
            n_in, n_out = (d[0], d[1]) if node.op_type == "MatMul" else (d[1], d[0])
            a_shape, b_shape = [n_in, f"r{i}"], [f"r{i}", n_out]
        else:
            n_out, n_in = d[0], d[1]
            a_shape, b_shape = [f"r{i}", n_in], [n_out, f"r{i}"]
        g.input.extend([helper.make_tensor_value_info(a_name, TensorProto.FLOAT, a_shape),
                        helper.make_tensor_value_info(b_name, TensorProto.FLOAT, b_shape),
                        helper.make_tensor_value_info(s_name, TensorProto.FLOAT, [f"r{i}"])])
        x, y = node.input[0], node.output[0]
        p = f"/adapter/{component}/{i}"
        main = p + "/main"
        node.output[0] = main
        if kind == "matmul":
            body = [helper.make_node("MatMul", [x, a_name], [p + "/xa"], name=p + "/MatMul_A"),
                    helper.make_node("Mul", [p + "/xa", s_name], [p + "/xas"], name=p + "/Mul_s"),
                    helper.make_node("MatMul", [p + "/xas", b_name], [p + "/xab"], name=p + "/MatMul_B")]
            delta = p + "/xab"
        else:
            body = [helper.make_node("Constant", [], [p + "/flat"], name=p + "/flat_shape",
                                     value=helper.make_tensor(p + "/flat_v", TensorProto.INT64, [3], [0, n_in, -1])),
                    helper.make_node("Reshape", [x, p + "/flat"], [p + "/x3"], name=p + "/Reshape_x"),
                    helper.make_node("MatMul", [a_name, p + "/x3"], [p + "/ax"], name=p + "/MatMul_A"),
                    helper.make_node("Constant", [], [p + "/axis1"], name=p + "/axis1",
                                     value=helper.make_tensor(p + "/axis1_v", TensorProto.INT64, [1], [1])),
                    helper.make_node("Unsqueeze", [s_name, p + "/axis1"], [p + "/s_col"], name=p + "/Unsqueeze_s"),
                    helper.make_node("Mul", [p + "/ax", p + "/s_col"], [p + "/axs"], name=p + "/Mul_s"),
                    helper.make_node("MatMul", [b_name, p + "/axs"], [p + "/bax"], name=p + "/MatMul_B"),
                    helper.make_node("Shape", [main], [p + "/shape"], name=p + "/Shape_y"),
                    helper.make_node("Reshape", [p + "/bax", p + "/shape"], [p + "/delta"], name=p + "/Reshape_delta")]
            delta = p + "/delta"
        body.append(helper.make_node("Add", [main, delta], [y], name=p + "/Add"))
        new_nodes[id(node)] = body
        rows.append({"module": key[: -len(".weight")] if key.endswith(".weight") else key, "kind": kind,
                     "in": int(n_in), "out": int(n_out), "inputs": [a_name, b_name, s_name]})
    ordered = []
    for n in g.node:  # each branch right after its layer: the graph stays topologically sorted
        ordered.append(n)
        ordered.extend(new_nodes.get(id(n), []))
    del g.node[:]
    g.node.extend(ordered)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    onnx.save_model(model, str(tmp))
    tmp.replace(dst)
    return rows
