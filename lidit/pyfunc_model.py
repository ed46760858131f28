"""Models-from-code entry of the LI-DiT pyfunc flavor (`lidit.pyfunc`): MLflow runs this file to get the model."""

from mlflow.models import set_model

from lidit.pyfunc import LiDiTPyfunc

set_model(LiDiTPyfunc())
