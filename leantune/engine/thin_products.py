"""Thin matrix products that read one tensor, run as one product: a graph pass of ``lt.compile``.

Where several low-rank deltas read one input (a decoder layer's q, k and v read one normed
hidden state; gate and up another), the backward runs thin products per site on that input:
``x Aᵢᵀ`` (rebuilt for ``Bᵢ``'s gradient) and ``(g Bᵢ)ᵀ x`` (``Aᵢ``'s gradient). Each reads all
of ``x`` (T × K) to produce r columns, so it runs far below the memory bandwidth and pays a
launch and a split-K reduction of its own (H100, 1B Llama, 4,096 tokens: 14–16 µs each, about
1 TB/s; device log, session 7). With the factors side by side, one product reads ``x`` once:
``x [A₁; A₂; A₃]ᵀ`` and ``[g B₁ | g B₂ | g B₃]ᵀ x``, sliced back into the sites' results. Each
output element is the same dot product as before; only how cuBLAS blocks its reduction may
differ.

The pass rewrites inductor's post-grad graphs (forward and backward) and groups only what it
can without moving work past a consumer: products whose thin operands are all computed
before any of their results is used.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass

aten = torch.ops.aten
# The widest thin side (the rank of the deltas, stacked) a product may have to join a group:
# wider ones are no longer bandwidth-starved, and concatenating them would copy real weight.
MAX_THIN = 64


class GroupThinProducts(CustomGraphPass):
    """The pass as inductor takes it (``post_grad_custom_post_pass``), with a ``uuid`` from this
    file's text so that inductor's cache keeps working."""

    def __call__(self, graph: fx.Graph) -> None:
        group_thin_products(graph)

    def uuid(self) -> str:
        return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def group_thin_products(graph: fx.Graph) -> int:
    """Rewrite every group of thin ``mm`` nodes that share an operand as one ``mm``; return how
    many products were merged into groups."""
    merged = 0
    while (found := _next_group(graph)) is not None:
        _replace(graph, *found)
        merged += len(found[2])
    return merged


def _thin_sides(node: fx.Node) -> list[tuple[fx.Node, int]]:
    """(the shared operand, its side: 0 left, 1 right) for each way ``node`` is a thin ``mm``:
    ``X @ Q`` with ``Q`` K × r is thin on the right, ``P @ X`` with ``P`` r × T on the left."""
    if node.target is not aten.mm.default or not all("val" in a.meta for a in node.args):
        return []  # a node another pass made without its value is left as it is
    left, right = node.args
    # a symbolic size is left alone: comparing it here would add a guard after tracing
    return [key for key, thin in (((left, 0), _shape(right)[1]), ((right, 1), _shape(left)[0]))
            if isinstance(thin, int) and thin <= MAX_THIN]


def _shape(node: fx.Node) -> torch.Size:
    return node.meta["val"].shape


def _next_group(graph: fx.Graph) -> tuple[fx.Node, int, list[fx.Node]] | None:
    order = {n: i for i, n in enumerate(graph.nodes)}
    candidates: dict[tuple[fx.Node, int], list[fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        for key in _thin_sides(node):
            candidates[key].append(node)
    for (shared, side), nodes in candidates.items():
        for group in _schedulable(nodes, order):
            return shared, side, group
    return None


def _is_view_of_inputs(node: fx.Node) -> bool:
    """A view of the graph's inputs (``Aᵀ`` of a factor): free, and valid anywhere after them."""
    return node.op == "call_function" and node.target in _VIEWS and all(
        a.op == "placeholder" or _is_view_of_inputs(a) for a in node.all_input_nodes)


_VIEWS = {aten.permute.default, aten.t.default, aten.transpose.int, aten.view.default, aten.reshape.default,
          aten._unsafe_view.default, aten.slice.Tensor, aten.alias.default}


def _ready(node: fx.Node, order: dict[fx.Node, int]) -> int:
    """Where ``node``'s value first exists: its place, or for a view of the graph's inputs,
    the place of the last input it views (it can move up to there)."""
    if _is_view_of_inputs(node):
        return max(_ready(a, order) for a in node.all_input_nodes)
    return order[node]


def _schedulable(nodes: list[fx.Node], order: dict[fx.Node, int]) -> Iterator[list[fx.Node]]:
    """Groups of two or more of ``nodes`` (taken in the order their inputs are ready) whose
    inputs all exist before any member's result is first used: one product can then stand
    where the last input is made, with no consumer moved."""
    def ready(n: fx.Node) -> int:
        return max(_ready(a, order) for a in n.all_input_nodes)

    def first_use(n: fx.Node) -> int:
        return min((order[u] for u in n.users), default=len(order))

    group: list[fx.Node] = []
    for node in sorted(nodes, key=ready):
        trial = [*group, node]
        if max(map(ready, trial)) < min(map(first_use, trial)):
            group = trial
            continue
        if len(group) > 1:
            yield group
        group = [node]
    if len(group) > 1:
        yield group


def _replace(graph: fx.Graph, shared: fx.Node, side: int, group: list[fx.Node]) -> None:
    order = {n: i for i, n in enumerate(graph.nodes)}
    thin = [m.args[1 - side] for m in group]
    cat_dim = 1 if side == 0 else 0  # factors side by side: Q's columns, or P's rows
    widths = [_shape(t)[cat_dim] for t in thin]
    inputs = sorted({a for m in group for a in m.all_input_nodes}, key=order.__getitem__)
    nodes = list(graph.nodes)
    anchor = nodes[max(_ready(a, order) for a in inputs)]
    if anchor.op == "placeholder":  # new nodes go after the graph's inputs, never among them
        anchor = next(n for n in reversed(nodes) if n.op == "placeholder")
    # views of the graph's inputs that stand later in the graph move up to the anchor
    anchor = _move_views_after(anchor, inputs, order)
    with graph.inserting_after(anchor):
        stacked = _call(graph, aten.cat.default, (thin, cat_dim))
    with graph.inserting_after(stacked):
        product = _call(graph, aten.mm.default, (shared, stacked) if side == 0 else (stacked, shared))
    anchor, start = product, 0
    for member, width in zip(group, widths, strict=True):
        with graph.inserting_after(anchor):
            anchor = _call(graph, aten.slice.Tensor, (product, cat_dim, start, start + width))
        member.replace_all_uses_with(anchor)
        graph.erase_node(member)
        start += width


def _move_views_after(anchor: fx.Node, inputs: list[fx.Node], order: dict[fx.Node, int]) -> fx.Node:
    """Move the views among ``inputs`` (and the views they are built from) that stand after
    ``anchor`` to just after it, in order; return the last node so placed."""
    limit, moved = order[anchor], set()
    for node in inputs:
        if not _is_view_of_inputs(node):
            continue
        for part in (*_view_chain(node), node):
            if order[part] > limit and part not in moved:
                anchor.append(part)
                anchor = part
                moved.add(part)
    return anchor


def _view_chain(node: fx.Node) -> list[fx.Node]:
    """The views that ``node`` (a view of the graph's inputs) is built from, first first."""
    chain = [a for a in node.all_input_nodes if a.op != "placeholder"]
    return [p for a in chain for p in (*_view_chain(a), a)]


def _call(graph: fx.Graph, target, args: tuple) -> fx.Node:
    """A new node with its fake value, which inductor's lowering reads."""
    node = graph.call_function(target, args)
    values = fx.node.map_arg(args, lambda n: n.meta["val"])
    fake_mode = torch._guards.detect_fake_mode(values)
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        node.meta["val"] = target(*values)
    return node
