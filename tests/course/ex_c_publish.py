# IV.C Publier sur un topic -- adapted: host/port/credentials from argv; publishes
# once to each --topic (the course's "isima/GX", then the other topics it asks
# to try) every --period seconds instead of to "isima/GX" every 5 s forever,
# then listens --listen seconds and stops. It publishes once its subscription
# to isima/# is acknowledged, so it sees its own accepted messages come back.
import threading
import time

import paho.mqtt.client as mqtt

import common

def extra(p):
    p.add_argument("--topic", action="append", default=[])
    p.add_argument("--period", type=float, default=0.1)
    p.add_argument("--listen", type=float, default=1.0)

a = common.args("C: publish", extra)
subscribed = threading.Event()

def on_connect(client, userdata, flags, rc):
    print("Connected with result code => "+mqtt.connack_string(rc))

def on_subscribe(client, userdata, mid, granted_qos):
    print("Subscribed: " + str(mid) + " " + str(granted_qos))
    subscribed.set()

def on_message(client, userdata, msg):
    print("Received message '" + str(msg.payload) + "' on topic '" + msg.topic + "' with QoS "
          + str(msg.qos))
    if msg.retain == 1:
        print("This is a retained message")

def on_publish(client, userdata, mid):
    print("-- on_publish callback -- mid: " + str(mid) )

client = mqtt.Client()

client.on_subscribe = on_subscribe
client.on_message = on_message
client.on_connect = on_connect
client.on_publish = on_publish

try:
    client.username_pw_set(username=a.username, password=a.password)
    client.connect(a.host, a.port)

except:
    print("Connection Failed")

client.subscribe("isima/#", qos=0)

client.loop_start()
if not subscribed.wait(10):
    raise SystemExit("no SUBACK for isima/#")

for topic in a.topic or ["isima/" + a.gx]:
    (rc, mid) = client.publish(topic=topic, payload="TEST_" + a.gx, qos=0)
    print("Error return from publish of mid = " + str(mid) + " : " + mqtt.error_string(rc))

    time.sleep(a.period)

time.sleep(a.listen)
client.disconnect()
client.loop_stop()
