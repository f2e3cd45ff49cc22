"""Post-hoc predictor of post-RL performance from pre-RL metrics of SFT checkpoints (Kang et al., 2025).

A few SFT checkpoints went through RL; all of them have cheap pre-RL metrics (held-out loss, pass@k). A linear
fit of the post-RL score on those metrics, calibrated on the few, ranks the others. Modules:
- `table`: the input table (CSV), validated; `runs`: the same table built from run directories;
- `regression`: OLS / ridge fits, leave-one-out, rank correlations, bootstrap (`FitResult`);
- `analysis`: feature sets compared, the best one, predictions and the plain-language summary;
- `report`: the self-contained HTML page (matplotlib; the only module here that imports it).

The pure modules import only numpy (and the stdlib); `report` is imported on its own by the report script.
"""

from nemo_quagmire.predict.analysis import (
    Analysis,
    analyze,
    default_feature_sets,
    fit_records,
    parse_feature_sets,
    prediction_rows,
    summarize,
)
from nemo_quagmire.predict.regression import FitResult, LinearModel, fit_feature_set
from nemo_quagmire.predict.runs import RUN_INFO_FILE, table_from_runs
from nemo_quagmire.predict.table import PredictInputError, Table, read_table, table_to_csv

__all__ = [
    "RUN_INFO_FILE",
    "Analysis",
    "FitResult",
    "LinearModel",
    "PredictInputError",
    "Table",
    "analyze",
    "default_feature_sets",
    "fit_feature_set",
    "fit_records",
    "parse_feature_sets",
    "prediction_rows",
    "read_table",
    "summarize",
    "table_from_runs",
    "table_to_csv",
]
