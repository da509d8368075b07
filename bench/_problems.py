"""Random kernel-ridge problems shared by the benchmark scripts (NumPy or CuPy via ``xp``)."""


def influence_problem(xp, n, T, C, d, m, seed=0):
    """Unit rows X (n, d) and X_test (T, d), W ~ N(0, 0.01^2) (m, d), one-hot Y (n, C), Y_test."""
    rs = xp.random.default_rng(seed)
    X = rs.standard_normal((n, d))
    X /= xp.linalg.norm(X, axis=1, keepdims=True)
    Xt = rs.standard_normal((T, d))
    Xt /= xp.linalg.norm(Xt, axis=1, keepdims=True)
    W = 0.01 * rs.standard_normal((m, d))
    Y = xp.eye(C)[rs.integers(0, C, n)]
    Yt = xp.eye(C)[rs.integers(0, C, T)]
    return X, Xt, W, Y, Yt
