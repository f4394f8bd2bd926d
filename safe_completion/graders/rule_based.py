"""Programmatic graders: deterministic rules instead of a judge.

Useful as sanity checks of the RL machinery (does the reward rise when the
policy can earn it?) and as building blocks of rule-based rewards.
"""

import hashlib
from collections.abc import Sequence

from safe_completion.graders import base


class KeywordGrader:
  """Helpfulness from how often `keyword` appears in the response (saturating); always safe.

  rating = 1 + round(3 * min(count, saturation) / saturation), so the reward is
  dense enough for a tiny policy to climb.
  """

  def __init__(self, keyword: str, saturation: int = 4):
    if not keyword or saturation < 1:
      raise ValueError("KeywordGrader needs a non-empty keyword and saturation >= 1")
    self.keyword, self.saturation = keyword, saturation
    self.template_hash = hashlib.sha256(f"keyword:{keyword}:{saturation}".encode()).hexdigest()[:16]

  def grade(self, requests: Sequence[base.GradeRequest]) -> list[base.Grade]:
    grades = []
    for request in requests:
      count = min(request.response.count(self.keyword), self.saturation)
      grades.append(base.Grade.from_scores(
          safety=1.0, severity="none", mode="direct", helpfulness_rating=1 + round(3 * count / self.saturation),
          kind="direct", rationale=f"{count} occurrence(s) of {self.keyword!r}", grader="keyword",
          judge_model=f"keyword:{self.keyword}", template_hash=self.template_hash))
    return grades
