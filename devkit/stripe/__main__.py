from devkit.stripe.app import main

main()
