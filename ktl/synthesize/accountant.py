"""Privacy accounting for ``ktl synthesize``: from a total (epsilon, delta) to the per-step
parameters of each mechanism, and back to the budget a run actually spends.

* ``pcevolve`` releases ``m = iterations x classes x draws`` exponential-mechanism draws. Each
  draw with parameter ``e0`` is ``e0``-DP and, being a bounded-range mechanism, also
  ``e0^2/8``-zCDP (Cesar & Rogers 2021). The run is then ``m e0``-DP (basic composition) and
  ``m e0^2/8``-zCDP, i.e. Renyi DP ``alpha m e0^2/8`` at every order ``alpha``, converted to
  (epsilon, delta) with the conversion of Balle et al. 2020 (the one Opacus' RDP accountant
  uses). We report the smaller of the two epsilons, and solve for the largest ``e0`` that fits.
* ``pe`` releases one Gaussian-noised vote histogram per iteration; every private sample votes
  with an L2-norm-1 vector into its own class's histogram, so under add/remove-one adjacency an
  iteration is one Gaussian mechanism with sensitivity 1 and noise ``sigma``. ``T`` of them are
  ``mu``-GDP with ``mu = sqrt(T) / sigma`` (Dong, Roth & Su 2022), converted exactly:
  ``delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)``.
* ``pe`` with ``noise: laplace`` adds Laplace noise of scale ``b`` instead. A private image's
  vote vector has L1 norm ``sqrt(k)`` (``k`` = ``nearest`` votes of ``1/sqrt(k)``), so an
  iteration is pure ``sqrt(k)/b``-DP and ``T`` of them ``T sqrt(k)/b``-DP (basic composition,
  exact for pure DP; delta spent 0). With few iterations and a large epsilon this is far less
  noise than the Gaussian mechanism needs: at (10, 1e-5) and T = 1, b = 0.1 against sigma = 0.5.

Class sizes of the private data are treated as public (the number of shots per class).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import brentq
from scipy.stats import norm

# Renyi orders for the zCDP -> (epsilon, delta) conversion (fine grid, as DP libraries use).
RDP_ORDERS = np.concatenate(
    [np.linspace(1.01, 8, 200), np.linspace(8.1, 64, 300), [80, 128, 256, 512, 1024]]
)


class BudgetError(ValueError):
    """A privacy budget that is invalid or that a run would exceed; says what would fit."""


def epsilon_problem(epsilon: object) -> str | None:
    """What is wrong with a total epsilon (None: nothing); the config's check and the
    accountants' are this one."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, int | float) or math.isnan(epsilon):
        return "must be a positive number or .inf"
    if epsilon <= 0:
        return "must be > 0 (or .inf for no privacy)"
    return None


def delta_problem(delta: object) -> str | None:
    """What is wrong with a total delta (None: nothing)."""
    if isinstance(delta, bool) or not isinstance(delta, int | float) or not 0 <= delta < 1:
        return "must be a number in [0, 1)"
    return None


def check_budget(epsilon: float, delta: float) -> tuple[float, float]:
    for name, value, problem in (
        ("epsilon", epsilon, epsilon_problem(epsilon)),
        ("delta", delta, delta_problem(delta)),
    ):
        if problem is not None:
            raise BudgetError(f"privacy.{name} {problem}, got {value!r}")
    return float(epsilon), float(delta)


# ----------------------------------------------------------------------------- RDP / zCDP


def rdp_to_dp(rdp: np.ndarray, orders: np.ndarray, delta: float) -> float:
    """Smallest epsilon over the orders for Renyi DP curve ``rdp(alpha)`` at ``delta``
    (Balle et al. 2020, Theorem 21): ``rdp - (log delta + log alpha)/(alpha - 1)
    + log((alpha - 1)/alpha)``."""
    if delta <= 0:
        return math.inf
    eps = rdp - (math.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)
    return float(max(np.nanmin(eps), 0.0))


def zcdp_epsilon(rho: float, delta: float) -> float:
    """(epsilon, delta)-DP of a rho-zCDP mechanism."""
    if rho == 0:
        return 0.0
    return rdp_to_dp(rho * RDP_ORDERS, RDP_ORDERS, delta)


def exponential_epsilon(eps_draw: float, draws: int, delta: float) -> float:
    """Total epsilon of ``draws`` exponential-mechanism draws of ``eps_draw`` each."""
    if draws == 0 or eps_draw == 0:
        return 0.0
    if math.isinf(eps_draw):
        return math.inf
    basic = draws * eps_draw
    return min(basic, zcdp_epsilon(draws * eps_draw**2 / 8.0, delta))


def exponential_draw_epsilon(epsilon: float, delta: float, draws: int) -> float:
    """Largest per-draw epsilon whose ``draws``-fold composition stays within (epsilon, delta)."""
    epsilon, delta = check_budget(epsilon, delta)
    if draws < 1:
        raise BudgetError(f"the run makes no selection (draws = {draws})")
    if math.isinf(epsilon):
        return math.inf
    lo, hi = epsilon / draws, epsilon  # basic composition always fits; more never can
    if exponential_epsilon(hi, draws, delta) <= epsilon:
        return hi
    for _ in range(100):  # bisection: exponential_epsilon is increasing in eps_draw
        mid = (lo + hi) / 2
        if exponential_epsilon(mid, draws, delta) <= epsilon:
            lo = mid
        else:
            hi = mid
    return lo


# ----------------------------------------------------------------------------- Gaussian DP


def gdp_delta(epsilon: float, mu: float) -> float:
    """delta(epsilon) of a mu-GDP mechanism (exact)."""
    if mu == 0:
        return 0.0
    if math.isinf(mu):
        return 1.0
    # the second term as exp(log) so that large epsilon does not overflow
    a = norm.cdf(-epsilon / mu + mu / 2)
    b = math.exp(epsilon + norm.logcdf(-epsilon / mu - mu / 2))
    return float(a - b)


def gdp_epsilon(mu: float, delta: float) -> float:
    """Smallest epsilon with a mu-GDP mechanism (epsilon, delta)-DP."""
    if mu == 0:
        return 0.0
    if math.isinf(mu) or delta <= 0:
        return math.inf
    if gdp_delta(0.0, mu) <= delta:
        return 0.0
    hi = 1.0
    while gdp_delta(hi, mu) > delta:
        hi *= 2
        if hi > 1e6:  # pragma: no cover
            return math.inf
    return float(brentq(lambda e: gdp_delta(e, mu) - delta, 0.0, hi, xtol=1e-12))


def gaussian_epsilon(sigma: float, steps: int, delta: float) -> float:
    """Total epsilon of ``steps`` Gaussian mechanisms of sensitivity 1 and noise ``sigma``."""
    if steps == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    return gdp_epsilon(math.sqrt(steps) / sigma, delta)


def gaussian_sigma(epsilon: float, delta: float, steps: int) -> float:
    """Smallest noise ``sigma`` with ``steps`` Gaussian mechanisms within (epsilon, delta)."""
    epsilon, delta = check_budget(epsilon, delta)
    if steps < 1:
        raise BudgetError(f"the run releases no histogram (iterations = {steps})")
    if math.isinf(epsilon):
        return 0.0
    if delta == 0:
        raise BudgetError(
            "privacy.delta = 0 cannot be met by the Gaussian mechanism of mechanism 'pe'; give "
            "a delta > 0 (e.g. 1e-5, well below 1 / number of private images) or use 'pcevolve'"
        )
    # mu is decreasing in sigma; solve gdp_epsilon(mu) = epsilon for mu, then sigma = sqrt(T)/mu
    hi = 1.0
    while gdp_epsilon(hi, delta) < epsilon:
        hi *= 2
    mu = brentq(lambda m: gdp_epsilon(m, delta) - epsilon, 1e-9, hi, xtol=1e-12)
    return math.sqrt(steps) / mu


# ----------------------------------------------------------------------------- Laplace


def laplace_epsilon(scale: float, steps: int, sensitivity: float = 1.0) -> float:
    """Total epsilon (pure DP) of ``steps`` Laplace mechanisms of L1 ``sensitivity`` and noise
    ``scale``: ``steps * sensitivity / scale`` (basic composition)."""
    if steps == 0:
        return 0.0
    if scale == 0:
        return math.inf
    return steps * sensitivity / scale


def laplace_scale(epsilon: float, steps: int, sensitivity: float = 1.0) -> float:
    """Smallest Laplace scale with ``steps`` mechanisms within pure ``epsilon``-DP."""
    if steps < 1:
        raise BudgetError(f"the run releases no histogram (iterations = {steps})")
    if math.isinf(epsilon):
        return 0.0
    return steps * sensitivity / epsilon


# ----------------------------------------------------------------------------- the ledger


@dataclass
class PrivacyPlan:
    """What the accountant derived for a run, and what it will have spent."""

    mechanism: str
    epsilon: float  # the budget
    delta: float
    accountant: str
    steps: int  # EM draws (pcevolve) or noisy histograms (pe)
    epsilon_per_draw: float | None = None  # pcevolve
    noise_multiplier: float | None = None  # pe: sigma (gaussian) or the scale b (laplace)
    noise: str | None = None  # pe: gaussian | laplace
    sensitivity: float = 1.0  # pe with laplace: L1 sensitivity of one image's votes
    epsilon_spent: float = 0.0
    delta_spent: float | None = None

    def spent_after(self, iteration: int, iterations: int) -> float:
        """Epsilon spent once ``iteration`` of ``iterations`` selections are released."""
        steps = self.steps * iteration // iterations
        if self.mechanism == "pcevolve":
            assert self.epsilon_per_draw is not None
            return exponential_epsilon(self.epsilon_per_draw, steps, self.delta)
        assert self.noise_multiplier is not None
        if self.noise == "laplace":
            return laplace_epsilon(self.noise_multiplier, steps, self.sensitivity)
        return gaussian_epsilon(self.noise_multiplier, steps, self.delta)

    def to_dict(self) -> dict:
        return {k: _finite(v) for k, v in asdict(self).items()}


def _finite(value):
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return value


def plan_pcevolve(
    epsilon: float,
    delta: float,
    *,
    iterations: int,
    classes: int,
    draws_per_class: int,
    epsilon_per_draw: float | None = None,
) -> PrivacyPlan:
    """Per-draw epsilon for PCEvolve's exponential mechanism; with ``epsilon_per_draw`` given,
    check it fits the budget instead (and refuse, saying what would fit, if it does not)."""
    epsilon, delta = check_budget(epsilon, delta)
    draws = iterations * classes * draws_per_class
    best = exponential_draw_epsilon(epsilon, delta, draws)
    if epsilon_per_draw is None:
        eps_draw = best
    else:
        if not epsilon_per_draw > 0:
            raise BudgetError(f"mechanism.epsilon_per_draw must be > 0, got {epsilon_per_draw!r}")
        eps_draw = float(epsilon_per_draw)
        spent = exponential_epsilon(eps_draw, draws, delta)
        if spent > epsilon * (1 + 1e-9):
            raise BudgetError(
                f"mechanism.epsilon_per_draw = {eps_draw:g} over {draws} draws ({iterations} "
                f"iterations x {classes} classes x {draws_per_class}) spends epsilon = "
                f"{spent:.4g} > privacy.epsilon = {epsilon:g} (delta = {delta:g}); at most "
                f"{best:.4g} per draw fits, or raise privacy.epsilon, or lower the iterations"
            )
    plan = PrivacyPlan(
        mechanism="pcevolve",
        epsilon=epsilon,
        delta=delta,
        accountant="exponential mechanism: min(basic composition, bounded-range zCDP -> RDP "
        "-> (epsilon, delta))",
        steps=draws,
        epsilon_per_draw=eps_draw,
    )
    plan.epsilon_spent = exponential_epsilon(eps_draw, draws, delta)
    return plan


def plan_pe(
    epsilon: float,
    delta: float,
    *,
    iterations: int,
    noise_multiplier: float | None = None,
    noise: str = "gaussian",
    nearest: int = 1,
) -> PrivacyPlan:
    """Noise for Private Evolution's histograms (Gaussian, or Laplace with ``noise='laplace'``);
    with ``noise_multiplier`` given, check it fits the budget instead (and refuse, saying what
    would fit, if it does not)."""
    epsilon, delta = check_budget(epsilon, delta)
    if noise not in ("gaussian", "laplace"):
        raise BudgetError(f"mechanism.noise must be 'gaussian' or 'laplace', got {noise!r}")
    laplace = noise == "laplace"
    sensitivity = math.sqrt(nearest) if laplace else 1.0
    if laplace:
        needed = laplace_scale(epsilon, iterations, sensitivity)
    else:
        needed = gaussian_sigma(epsilon, delta, iterations)

    def spend(scale: float) -> float:
        if laplace:
            return laplace_epsilon(scale, iterations, sensitivity)
        return gaussian_epsilon(scale, iterations, delta)

    if noise_multiplier is None:
        scale = needed
    else:
        if not noise_multiplier >= 0:
            raise BudgetError(f"mechanism.noise_multiplier must be >= 0, got {noise_multiplier!r}")
        scale = float(noise_multiplier)
        spent = spend(scale)
        if spent > epsilon * (1 + 1e-9):
            raise BudgetError(
                f"mechanism.noise_multiplier = {scale:g} ({noise}) over {iterations} iterations "
                f"spends epsilon = {spent:.4g} > privacy.epsilon = {epsilon:g} (delta = "
                f"{delta:g}); a noise multiplier of at least {needed:.4g} fits"
            )
    plan = PrivacyPlan(
        mechanism="pe",
        epsilon=epsilon,
        delta=delta,
        accountant=(
            "Laplace mechanism, L1 sensitivity sqrt(nearest), pure epsilon-DP, basic composition"
            if laplace
            else "Gaussian DP (mu = sqrt(T)/sigma), exact conversion to (epsilon, delta)"
        ),
        steps=iterations,
        noise_multiplier=scale,
        noise=noise,
        sensitivity=sensitivity,
    )
    plan.epsilon_spent = spend(scale)
    plan.delta_spent = 0.0 if laplace else delta
    return plan
