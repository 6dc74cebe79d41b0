"""The provider simulator: an HTTP server speaking Twilio's and SendGrid's APIs (rules: services/common/simulation.py)."""
from services.simulator.signing import SIMULATOR_SENDGRID_PUBLIC_KEY

__all__ = ["SIMULATOR_SENDGRID_PUBLIC_KEY"]
