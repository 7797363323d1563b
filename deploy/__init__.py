"""Deployment tools for running fedshield on Flower's SuperLink / SuperNode runtime.

``deploy.certs`` writes the TLS certificates and SuperNode authentication keys;
``deploy.federation`` starts a SuperLink and N SuperNodes on one machine;
``deploy.superexec`` (``fedshield-superexec``) forks a SuperNode's ClientApp processes
from one that imported Flower and torch once. The shell
scripts next to them start single components on separate machines. See
the "Deploy" section of the README.
"""
