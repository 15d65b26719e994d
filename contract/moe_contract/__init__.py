"""The operator -> worker contract, torch-free: the plan document and what a plan change moves
(`plan`), the answer to a plan switch (`switch`), the model's shape (`shape`) and the pod
environment the operator sets (`env`). Both products import it; it imports neither (an
import-linter contract)."""
