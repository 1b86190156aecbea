"""The pyfunc model as code (MLflow's models-from-code): MLflow runs this file to build it,
instead of unpickling a Python object."""

from mlflow.models import set_model

from ser.serving import EmotionModel

set_model(EmotionModel())
