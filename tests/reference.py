"""Small, obvious float64 reference implementations (STYLE rule 5: kept forever).

Every fast path in ntkcore is tested against one of these. They favour clarity over speed:
loops where a loop says what the math says, explicit inverses where the fast path avoids them.
Helpers append further references at the end of this file.
"""

from __future__ import annotations

import numpy as np


def rownorm(X):
    X = np.asarray(X, dtype=np.float64)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def gram_power_naive(X, p):
    """(X X^T)^p by repeated n x n products."""
    G = X @ X.T
    out = np.eye(X.shape[0])
    for _ in range(p):
        out = out @ G
    return out


def relu_ntk_naive(X, W, X2=None, a=None, train_a=False):
    """eNTK of f(x) = m^-1/2 a^T relu(W x) by its definition, one neuron at a time [Thm B.5].

    K(x, x') = (1/m) sum_r a_r^2 1[w_r.x > 0] 1[w_r.x' > 0] <x, x'>  (+ (1/m) sum_r relu relu
    if a trains); a_r^2 = 1 when ``a`` is None, else of output 0 (a's first column).
    """
    X2 = X if X2 is None else X2
    m = W.shape[0]
    a2 = np.ones(m) if a is None else np.reshape(a, (m, -1))[:, 0] ** 2
    K = np.zeros((X.shape[0], X2.shape[0]))
    dots = X @ X2.T
    for r in range(m):
        s1 = (X @ W[r] > 0).astype(float)
        s2 = (X2 @ W[r] > 0).astype(float)
        K += a2[r] * np.outer(s1, s2) * dots
        if train_a:
            K += np.outer(np.maximum(X @ W[r], 0), np.maximum(X2 @ W[r], 0))
    return K / m


def relu_ntk_infinite_naive(X, X2=None):
    """<x,x'> (pi - theta) / (2 pi), theta the angle between x and x', entry by entry."""
    X2 = X if X2 is None else X2
    K = np.empty((X.shape[0], X2.shape[0]))
    for i, x in enumerate(X):
        for j, y in enumerate(X2):
            u, v = x / np.linalg.norm(x), y / np.linalg.norm(y)
            # the angle between unit vectors, accurate also near 0 (arccos is not)
            theta = 2 * np.arctan2(np.linalg.norm(u - v), np.linalg.norm(u + v))
            K[i, j] = (x @ y) * (np.pi - theta) / (2 * np.pi)
    return K


def krr_fit_predict(K, Y, K_test, lam):
    """Kernel ridge regression with an explicit solve: predictions K_test (K + lam I)^-1 Y."""
    alpha = np.linalg.solve(K + lam * np.eye(K.shape[0]), Y)
    return K_test @ alpha


def loo_influence_bruteforce(K, Y, K_test, Y_test, lam):
    """Influence by refitting without each training point [Def 3.3]:

    I(i, t) = 1/2 (||f^{-i}(x_t) - y_t||^2 - ||f(x_t) - y_t||^2), returned as (T, n).
    """
    n = K.shape[0]
    full = krr_fit_predict(K, Y, K_test, lam)
    base = 0.5 * np.sum((full - Y_test) ** 2, axis=1)
    scores = np.empty((K_test.shape[0], n))
    for i in range(n):
        keep = np.arange(n) != i
        pred = krr_fit_predict(K[np.ix_(keep, keep)], Y[keep], K_test[:, keep], lam)
        scores[:, i] = 0.5 * np.sum((pred - Y_test) ** 2, axis=1) - base
    return scores


def loo_residuals_bruteforce(K, Y, lam):
    """y_i - f^{-i}(x_i) for every training point, by refitting."""
    n = K.shape[0]
    out = np.empty_like(Y, dtype=float)
    for i in range(n):
        keep = np.arange(n) != i
        pred = krr_fit_predict(K[np.ix_(keep, keep)], Y[keep], K[i:i + 1, keep], lam)
        out[i] = Y[i] - pred[0]
    return out


def spearman_naive(a, b):
    """Spearman rho via the rank-difference formula (no ties) [A.4.2]."""
    ra = np.argsort(np.argsort(a))
    rb = np.argsort(np.argsort(b))
    n = len(a)
    d = ra - rb
    return 1 - 6 * np.sum(d.astype(float) ** 2) / (n * (n * n - 1))


def autograd_entk(model, X, X2=None, output=0):
    """eNTK of a torch model by autograd, one example at a time [A.4.1]:

    K[i, j] = < d f_output(x_i) / d theta , d f_output(x2_j) / d theta >,
    theta = every parameter of ``model`` with requires_grad (W; also a when it trains).
    Call it on a float64 copy of the model (e.g. ``copy.deepcopy(model).double()``).
    X, X2 are model inputs (n, d); returns a float64 (n, n2) NumPy array.
    """
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    dtype = params[0].dtype

    def gradients(rows):
        out = []
        for x in torch.as_tensor(np.asarray(rows), dtype=dtype):
            f = model(x[None, :])[0, output]
            grads = torch.autograd.grad(f, params)
            out.append(torch.cat([g.reshape(-1) for g in grads]).to(torch.float64).numpy())
        return out

    G1 = gradients(X)
    G2 = G1 if X2 is None else gradients(X2)
    K = np.zeros((len(G1), len(G2)))
    for i in range(len(G1)):
        for j in range(len(G2)):
            K[i, j] = G1[i] @ G2[j]
    return K


def autograd_entk_generic(model, X, X2=None, outputs="trace"):
    """eNTK of any torch model by autograd, one example and one output at a time (float64).

    K[i, j, c, d] = < d f_c(x_i) / d theta , d f_d(x2_j) / d theta >, theta = every parameter
    with requires_grad, the model in eval mode on a float64 copy. X, X2: (n, ...) rows (NumPy
    or torch; integer rows are kept as indices). Returns NumPy float64: (n, n2) for "trace"
    (sum over c of K[:, :, c, c]), (n, n2, C, C) for "full", (n, n2) for an int output c.
    """
    import copy

    import torch

    model = copy.deepcopy(model).double().eval()
    params = [p for p in model.parameters() if p.requires_grad]

    def gradients(rows):
        rows = torch.as_tensor(np.asarray(rows))
        if rows.is_floating_point():
            rows = rows.to(torch.float64)
        G = []  # G[i][c]: flattened gradient of output c at row i
        for i in range(rows.shape[0]):
            f = model(rows[i:i + 1]).reshape(-1)
            per_output = []
            for c in range(f.shape[0]):
                grads = torch.autograd.grad(f[c], params, retain_graph=True, allow_unused=True)
                flat = [torch.zeros(p.numel(), dtype=torch.float64) if g is None else g.reshape(-1)
                        for g, p in zip(grads, params)]
                per_output.append(torch.cat(flat).numpy())
            G.append(per_output)
        return G

    G1 = gradients(X)
    G2 = G1 if X2 is None else gradients(X2)
    C = len(G1[0])
    K = np.zeros((len(G1), len(G2), C, C))
    for i in range(len(G1)):
        for j in range(len(G2)):
            for c in range(C):
                for d in range(C):
                    K[i, j, c, d] = G1[i][c] @ G2[j][d]
    if isinstance(outputs, str) and outputs == "full":
        return K
    if isinstance(outputs, str) and outputs == "trace":
        return np.einsum("ijcc->ij", K)
    return K[:, :, outputs, outputs]


def square_matrix_stats_naive(K):
    """(all entries finite, sum of K_ij^2, sum over i != j of (K_ij - K_ji)^2), in float64.

    The diagonal adds nothing to the second sum (K_ii - K_ii = 0), so it is the whole sum.
    """
    K = np.asarray(K, dtype=np.float64)
    return bool(np.isfinite(K).all()), float((K ** 2).sum()), float(((K - K.T) ** 2).sum())
