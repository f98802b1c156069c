"""Plain-language readings of the report's numbers, one short paragraph per section."""

from __future__ import annotations

import math

CURVATURE_NAMES = {
    "hessian": "Hessian (exact second derivative of the loss; may have negative eigenvalues)",
    "ggn": "Gauss-Newton matrix (GGN: positive semi-definite, the Hessian without the model's own curvature)",
    "fisher": "Fisher information (positive semi-definite)",
}
FISHER_KINDS = {
    "true": "the true Fisher, which equals the GGN for these losses",
    "mc": "a Monte Carlo Fisher (labels sampled from the model), which equals the GGN for these losses in expectation",
    "empirical": "the empirical Fisher (observed labels), which in general differs from the GGN and the Hessian "
                 "(Kunstner et al. 2019)",
}


BEYOND = ("locally unstable along the top eigenvector of the quadratic model at this point; in practice training "
          "often oscillates and self-stabilises at the edge of stability (Cohen et al. 2021).")


def _g(x: float | None) -> str:
    """A number to 4 significant digits, ``n/a`` if missing or not finite."""
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.4g}"


def overview(report: dict) -> str:
    """What was analysed: model, data, matrix, loss and gradient norm."""
    model, data, curvature = report["model"], report["data"], report["curvature"]
    return (
        f"Curvature of the training loss of {model['description']} with {model['num_parameters']:,} "
        f"analysed parameters, on {data['num_samples']:,} samples of {data['description']}. "
        f"The matrix is the {_matrix(curvature)}. The loss at the analysed "
        f"parameters is {_g(report['loss'])} and the gradient norm {_g(report['gradient_norm'])}. "
        "All estimates use only matrix-vector products: the matrix itself is never formed."
        + _training(report.get("training"))
    )


def _matrix(curvature: dict) -> str:
    """The matrix's name, and for a Fisher which one."""
    kind = CURVATURE_NAMES[curvature["kind"]]
    fisher = FISHER_KINDS.get(curvature.get("fisher_kind") or "") if curvature["kind"] == "fisher" else None
    return kind if fisher is None else f"{kind}: {fisher}"


def _training(training: dict | None) -> str:
    """How the built-in example was trained, if it was."""
    if not training:
        return ""
    return (f" The model was trained here with {training['optimizer']} (lr {training['lr']:g}, batch "
            f"{training['batch_size']}, {training['epochs']} epochs, seed {training['seed']}) to a training "
            f"loss of {_g(training['final_loss'])} and accuracy {100 * training['train_accuracy']:.1f}%.")


def eigenvalues(report: dict) -> str:
    """The top eigenvalues and the largest stable gradient-descent learning rate."""
    eig = report["results"]["eigenvalues"]
    values = [v for v in eig["values"] if v is not None]
    if not values:
        return "No eigenvalue estimate is a finite number; check the warnings below."
    top = values[0]
    text = (
        f"The largest eigenvalue (the sharpness) is λ₁ = {_g(top)}: in the quadratic model of the loss at "
        f"this point, a step of length t along its eigenvector adds λ₁·t²/2 to the first-order change, the "
        f"largest second-order term of any direction. With a learning rate beyond 2/λ₁ = "
        f"{_g(2 / top) if top > 0 else 'n/a'} (the threshold), gradient descent is {BEYOND} "
    )
    if len(values) > 1 and values[-1] > 0:
        text += (f"The top {len(values)} eigenvalues fall from {_g(top)} to {_g(values[-1])} "
                 f"(ratio {top / values[-1]:.3g}). ")
    if "density" not in report["results"]:
        text += _outlier_text(report.get("outliers"))
    unconverged = sum(1 for ok in eig["converged"] if not ok)
    if unconverged:
        text += f"{unconverged} of them did not reach the tolerance (hollow markers): treat them as rough."
    return text


def trace(report: dict) -> str:
    """The trace estimate, its error and the mean eigenvalue."""
    tr = report["results"]["trace"]
    P = report["model"]["num_parameters"]
    if tr["estimate"] is None:
        return "The trace estimate is not a finite number; check the warnings below."
    text = (
        f"The trace (sum of all {P:,} eigenvalues) is {_g(tr['estimate'])} ± {_g(tr['stderr'])} "
        f"(Hutch++, {tr['matvecs']} products), i.e. an average curvature of {_g(tr['estimate'] / P)} per "
        "parameter. The trace sums the curvature over all directions at once (for a Hessian, negative "
        "eigenvalues subtract)"
    )
    eig = report["results"].get("eigenvalues")
    if eig and tr["estimate"] > 0:
        share = sum(v for v in eig["values"] if v is not None) / tr["estimate"]
        text += f"; the top {len(eig['values'])} eigenvalues add up to {100 * share:.0f}% of it."
    else:
        text += "."
    return text


def density(report: dict) -> str:
    """The shape of the spectrum: bulk, outliers and negative mass."""
    dens = report["results"]["density"]
    text = (
        "The spectral density (stochastic Lanczos quadrature) shows how the eigenvalues are "
        "distributed; for trained networks the usual finding is a large bulk near zero and a few "
        "outliers to the right, about one per class for classifiers (Sagun et al. 2017; Papyan 2019; "
        "Ghorbani et al. 2019). The log-scale view makes the small outlier mass visible. "
    )
    text += _outlier_text(report.get("outliers"))
    negative = _negative_mass(dens)
    if negative > 0.01:
        text += (f"About {100 * negative:.0f}% of the eigenvalue mass is negative: directions of negative "
                 "curvature, so these parameters are not at a local minimum of the loss (the GGN and Fisher "
                 "have no negative eigenvalues).")
    return text


def _outlier_text(outliers: dict | None) -> str:
    """The outlier count with the rule and its reason (or why none stands out), and the source."""
    if not outliers:
        return ""
    text = (f"Outlier count (rule: {outliers.get('rule', 'n/a')}; {outliers.get('values_used', 'n/a')} reliable "
            f"values seen): ")
    count = outliers["num_outliers"]
    reason = outliers.get("reason") or f"{count} outlier(s)"
    if count:
        share = outliers.get("trace_share")
        text += (f"{reason}. The {count} outlier{'s' if count > 1 else ''} "
                 f"({', '.join(_g(v) for v in outliers['outliers'])}) stand{'s' if count == 1 else ''} above a "
                 f"bulk whose largest eigenvalue is {_g(outliers['bulk_edge'])}"
                 + ("" if share is None else f", and hold {100 * share:.0f}% of the trace") + ". ")
    else:
        text += f"{reason}. "
    classes = outliers.get("num_classes")
    if classes:
        text += f"The model has {classes} classes; the usual finding is {classes - 1} or {classes} outliers. "
    return text


def _negative_mass(dens: dict) -> float:
    """Quadrature weight of clearly negative Ritz values, averaged over probes."""
    nodes = [v for row in dens["ritz_values"] for v in row if v is not None]
    if not nodes:
        return 0.0
    cutoff = -1e-3 * max(abs(v) for v in nodes)
    mass = sum(w for nrow, wrow in zip(dens["ritz_values"], dens["weights"])
               for v, w in zip(nrow, wrow) if v is not None and v < cutoff)
    return mass / len(dens["ritz_values"])


def per_layer(report: dict) -> str:
    """Which blocks carry the most curvature per parameter, and which the ranking cannot separate."""
    layers = report["results"]["per_layer"]
    text = ("Each block is the diagonal block of the matrix for one layer's parameters (cross-layer "
            "terms are ignored), as in Q-BERT's per-layer analysis (Shen et al. 2020). Blocks are ranked by "
            "trace per parameter, Tr/n, a layer's average curvature, comparable across layers of different "
            "size (HAWQ-V2, Dong et al. 2020). ")
    ranking = layers.get("ranking") or []
    tpp, se = layers.get("trace_per_parameter") or {}, layers.get("trace_per_parameter_stderr") or {}
    if ranking and tpp.get(ranking[0]) is not None:
        first = ranking[0]
        error = se.get(first)
        text += (f"Highest: {first!r} with {_g(tpp[first])} ± {'n/a' if error is None else f'{error:.2g}'} "
                 "per parameter. ")
    ties = layers.get("indistinguishable") or []
    if ties:
        text += ("Not distinguishable within 2 standard errors (their order is noise): "
                 + "; ".join(f"{a!r} and {b!r}" for a, b in ties) + ". ")
    loose = [n for n, ok in (layers.get("rtol_met") or {}).items() if not ok]
    if loose:
        text += (f"The traces of {', '.join(repr(n) for n in loose)} did not reach {100 * layers['rtol']:g}% accuracy "
                 "within the products cap (--layer-probes). ")
    return text + ("In the standard reading (HAWQ-V2), layers with a higher trace per parameter are more "
                   "sensitive to perturbations of their weights such as quantisation noise.")


def stability(report: dict) -> str:
    """What the GD (and, for mini-batch training, the SGD) stability check says at the learning rate."""
    st = report["results"]["stability"]
    text = (
        f"At learning rate {_g(st['lr'])} the threshold is (2+2·momentum)/lr = {_g(st['gd_threshold'])}; "
        f"here λ₁ = {_g(st['top_eigenvalue'])} (ratio {_g(st['gd_ratio'])}) → {st['gd_verdict'].split(':')[0]}. "
        "This is a statement about the quadratic model of the loss at this point, not a prediction of "
        f"divergence: beyond the threshold, gradient descent is {BEYOND} A ratio near 1 is that edge "
        "of stability, where Cohen et al. observed the sharpness of full-batch training to settle. "
    )
    if st.get("full_batch"):
        assumed = (report.get("settings") or {}).get("train_batch_size_source") == "assumed"
        return text + (
            ("Full-batch GD assumed: no training batch size was given; pass --train-batch-size B for the "
             "mini-batch SGD check, whose condition is stricter for small B." if assumed else
             f"The batch size covers all {st.get('num_samples')} samples, so the SGD condition is the GD one.")
        )
    return text + _sgd_text(st)


def _sgd_text(st: dict) -> str:
    """The mini-batch SGD condition at the training batch size B."""
    B = st.get("batch_size") or 1
    if B == 1:
        return (
            f"For SGD with batch size 1, Wu & Su (2023) show that a minimum can only be linearly stable if "
            f"trace < 2/lr = {_g(st['sgd_threshold'])} (the analysed point need not be a minimum); here trace = {_g(st['trace'])} ± "
            f"{_g(st['trace_stderr'])} (ratio {_g(st['sgd_ratio'])}) → {st['sgd_verdict']}."
        )
    return (
        f"For SGD with batch size B = {B}, a minimum can only be stable if tr/B + (1−1/B)·λ₁ < 2/lr = "
        f"{_g(st['sgd_threshold'])}: Wu & Su's (2023) trace condition at B = 1, the GD condition "
        f"λ₁ < 2/lr for large B, and in between an approximation that assumes equal per-sample "
        f"gradient norms. Here trace = {_g(st['trace'])} ± {_g(st['trace_stderr'])}, so "
        f"tr/B + (1−1/B)·λ₁ = {_g(st.get('sgd_quantity'))} (ratio {_g(st['sgd_ratio'])}) → {st['sgd_verdict']}."
    )


def landscape(report: dict) -> str:
    """The loss range over the plotted plane around the weights."""
    land = report["results"]["landscape"]
    values = [v for row in land["loss"] for v in row if v is not None]
    return (
        f"The loss on a plane through the weights (the + at the centre, loss {_g(land['base_loss'])}), "
        "spanned by two random directions scaled filter by filter to the weights' own size (Li et al. "
        f"2018), so distances are comparable across layers. Over the plotted square the loss ranges "
        f"from {_g(min(values))} to {_g(max(values))}. In the usual reading (Li et al. 2018), wide, round "
        "contours mean a flat basin and tight contours a sharp one. A random plane mostly sees the bulk of the spectrum, not the few sharpest "
        "directions."
    )


def sharpness(report: dict) -> str:
    """The worst-case and average loss rise under small weight perturbations."""
    measures = report["results"]["sharpness"]
    worst, average = measures["worst"], measures["average"]
    return (
        f"Worst-case sharpness: the largest loss increase found within an L2 ball of radius "
        f"{_g(worst['details'].get('rho'))} around the weights is {_g(worst['value'])} (projected gradient "
        "ascent, a lower bound; Keskar et al. 2017, SAM). Average sharpness: under Gaussian weight noise "
        f"of standard deviation {_g(average['details'].get('sigma'))} the loss rises by {_g(average['value'])} "
        "on average (≈ σ²·trace/2 for a quadratic). Smaller values mean a flatter neighbourhood at these radii."
    )


SECTIONS = {
    "eigenvalues": eigenvalues, "trace": trace, "density": density,
    "per_layer": per_layer, "stability": stability, "landscape": landscape, "sharpness": sharpness,
}


def interpret(report: dict) -> dict[str, str]:
    """One paragraph per section present in ``report["results"]``, plus an overview."""
    texts = {"overview": overview(report)}
    for name, explain in SECTIONS.items():
        if name in report["results"]:
            texts[name] = explain(report)
    return texts
