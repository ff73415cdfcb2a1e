"""Knowledge distillation: a training loss that fits a (sparse) student to a teacher's
softened outputs as well as to the labels (Hinton, Vinyals & Dean 2015, *Distilling the
Knowledge in a Neural Network*, Sec. 2).

It is a loss, not an optax transformation: use it in the loss function of any jaxsparse
method's training step, with the teacher's logits computed from frozen parameters
(``jax.lax.stop_gradient``). It lives beside the penalties because, like them, it changes
what the sparse network is trained on rather than which weights it keeps.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import optax


def check_hyperparameters(temperature, alpha) -> None:
  """Raises (naming ``temperature`` or ``alpha``) unless ``temperature > 0`` and ``alpha`` is in
  ``[0, 1]``, both real numbers: :func:`distillation_loss`'s checks, without computing it."""
  if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
    raise TypeError(f"temperature must be a real number > 0, got {temperature!r}")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature!r}")
  if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
    raise TypeError(f"alpha must be a real number in [0, 1], got {alpha!r}")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
                      *, temperature: float, alpha: float) -> jax.Array:
  """Per-example distillation loss (Hinton et al. 2015, Sec. 2):

  ``alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, labels)``

  with ``s`` the student's and ``t`` the teacher's logits. The soft term's gradient
  with respect to ``s`` is ``(softmax(s / T) - softmax(t / T)) / T`` (the paper's
  Eq. 2), so it shrinks as ``1 / T^2`` at high temperature (Eq. 4); the ``T^2``
  factor keeps its size when ``T`` changes, "as recommended" in Sec. 2. The KL
  differs from the paper's soft-target cross-entropy by the teacher's entropy, a
  constant: same gradient, and 0 when student and teacher agree. At ``T = 1``,
  ``alpha = 0`` it is ``optax.softmax_cross_entropy_with_integer_labels``.

  Args:
    student_logits: ``[..., num_classes]``.
    teacher_logits: the same shape; no gradient flows into them.
    labels: integer labels of shape ``student_logits.shape[:-1]``.
    temperature: ``T > 0``, a Python number.
    alpha: the soft term's weight, in ``[0, 1]``.

  Returns:
    The loss of every example, shape ``labels.shape`` (take the mean for a batch).

  Raises:
    ValueError / TypeError: naming ``temperature``, ``alpha``, ``teacher_logits`` or
      ``labels`` for a bad value or shape.
  """
  check_hyperparameters(temperature, alpha)
  s = jnp.asarray(student_logits)
  t = jax.lax.stop_gradient(jnp.asarray(teacher_logits))
  if t.shape != s.shape:
    raise ValueError(f"teacher_logits must have the student's shape {s.shape}, got {t.shape}")
  if jnp.shape(labels) != s.shape[:-1]:
    raise ValueError(f"labels must have shape {s.shape[:-1]} (the logits' without the class "
                     f"axis), got {jnp.shape(labels)}")
  hard = optax.softmax_cross_entropy_with_integer_labels(s, labels)
  if alpha == 0:  # exactly the cross-entropy, and no softmax of the teacher to compute
    return hard
  log_q = jax.nn.log_softmax(t / temperature)   # teacher's soft targets
  log_p = jax.nn.log_softmax(s / temperature)   # student's
  kl = jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)
  return alpha * temperature ** 2 * kl + (1.0 - alpha) * hard
