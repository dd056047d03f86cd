"""The application API: users, Connect sessions, items with what they need, decrypted transactions, and
erasure, for the banking application behind bridgehook (``bridgehook api``; see the README's "Your
application and bridgehook").

It needs the database and the Bridge client, so it lives beside the workers rather than in the
receiver: ``api`` may import ``service`` and ``workers``; neither imports ``api``.
"""
