"""The trust layer: what the consortium learns about the model beyond its accuracy.

Every figure here comes from secure DP statistics (each silo noises its own vector
from its CSPRNG and charges its ledger; SecAgg+ reveals only the sum):

* silo side: :mod:`~fedguard.trust.silo_statistics` (the fairness and drift
  producers and the table the composition root gives the silo agent) and
  :mod:`~fedguard.trust.explanations` (Integrated Gradients with Captum);
* server side: :mod:`~fedguard.trust.phase` (the post-training phase: the fairness
  audit, the drift reference, global attributions; monitoring rounds),
  :mod:`~fedguard.trust.fairness` and :mod:`~fedguard.trust.drift` (the metrics
  on the released sums);
* after training: :mod:`~fedguard.trust.explain_release` (the edge student's
  attributions), :mod:`~fedguard.trust.results` (``trust.json``) and
  :mod:`~fedguard.trust.report` (its Markdown and plots).

The room sits above ``client`` and ``server`` (it uses their release and
collection machinery) and below ``edge`` (the model card reads its results).
Nothing is imported here, so a silo loading its producers loads no server code.
"""
